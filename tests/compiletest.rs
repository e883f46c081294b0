//! Compile tests of `#[derive(DomainEvent)]`: every misuse is a compile error on the
//! offending token with a message that says how to fix it (`tests/ui/fail`). What compiles
//! and how it behaves is tested in `tests/derive/`, as ordinary tests: with no passing case,
//! trybuild only runs `cargo check` (no code generation for the dependencies it builds in
//! its own target directory): 173 s instead of 273 s on CI's two cores.
//!
//! The `.stderr` snapshots depend on the compiler version pinned in `rust-toolchain.toml`.
//! Regenerate them with `TRYBUILD=overwrite cargo test --test compiletest` and read the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail/*.rs");
}
