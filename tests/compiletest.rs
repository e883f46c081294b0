//! Compile tests of `#[derive(DomainEvent)]`: every misuse is a compile error on the
//! offending token with a message that says how to fix it (`tests/ui/fail`), and every
//! attribute compiles and behaves (`tests/ui/pass`).
//!
//! The `.stderr` snapshots depend on the compiler version pinned in `rust-toolchain.toml`.
//! Regenerate them with `TRYBUILD=overwrite cargo test --test compiletest` and read the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
