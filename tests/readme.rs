//! The README's five-minute path is code that runs: every ```rust block of that section must
//! be found, line for line (each line's leading and trailing whitespace aside), in
//! `examples/five_minutes.rs`, which CI runs on both backends. The guarantees table names a
//! test for each guarantee: each must exist in the file it names. And the README opens with
//! the two commands CI and reviewers rely on. No server needed.

use std::path::Path;

const FIVE_MINUTES_HEADING: &str = "## Five minutes";
const EXAMPLE: &str = "examples/five_minutes.rs";

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

/// The lines of the level-2 section whose heading starts with `heading`, up to the next one,
/// each with its line number in the README.
fn section<'a>(readme: &'a str, heading: &str) -> Vec<(usize, &'a str)> {
    let lines: Vec<(usize, &str)> = readme.lines().enumerate().map(|(i, l)| (i + 1, l)).collect();
    let start = lines
        .iter()
        .position(|(_, l)| l.starts_with(heading))
        .unwrap_or_else(|| panic!("README.md has no section starting with `{heading}`"));
    let rest = &lines[start + 1..];
    let end = rest.iter().position(|(_, l)| l.starts_with("## ")).unwrap_or(rest.len());
    rest[..end].to_vec()
}

/// The ```rust blocks of `lines`, each with its first line's number, every line trimmed.
fn rust_blocks(lines: &[(usize, &str)]) -> Vec<(usize, Vec<String>)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, Vec<String>)> = None;
    for &(number, line) in lines {
        let fence = line.trim_start();
        match open.take() {
            None if fence.starts_with("```rust") => open = Some((number + 1, Vec::new())),
            None => {}
            Some(block) if fence.starts_with("```") => blocks.push(block),
            Some((start, mut body)) => {
                body.push(line.trim().to_owned());
                open = Some((start, body));
            }
        }
    }
    assert!(open.is_none(), "README.md: a ```rust block of the five-minute path is not closed");
    blocks
}

#[test]
fn every_rust_block_of_the_five_minute_path_is_in_the_example_verbatim() {
    let readme = read("README.md");
    let example: Vec<String> = read(EXAMPLE).lines().map(|l| l.trim().to_owned()).collect();
    let blocks = rust_blocks(&section(&readme, FIVE_MINUTES_HEADING));
    // Define, commit, consume, project, test: a path of fewer blocks lost one of its steps.
    assert!(
        blocks.len() >= 5,
        "the five-minute path shows {} ```rust blocks, expected at least 5",
        blocks.len()
    );
    for (line, block) in &blocks {
        assert!(!block.is_empty(), "README.md line {line}: an empty ```rust block");
        let found = example.windows(block.len()).any(|window| window == block.as_slice());
        if !found {
            // Name the first line that does not follow from the example, to find the drift.
            let longest = (1..=block.len())
                .take_while(|&n| example.windows(n).any(|w| w == &block[..n]))
                .last()
                .unwrap_or(0);
            panic!(
                "README.md line {line}: this ```rust block of the five-minute path is not in {EXAMPLE} \
                 (its first {longest} line(s) are; then: {:?}). Change the example and copy the block \
                 from it, so that the README shows code that runs.",
                block[longest]
            );
        }
    }
}

#[test]
fn every_test_the_guarantees_table_names_exists_in_its_file() {
    let readme = read("README.md");
    let mut cited = 0;
    for (_, row) in section(&readme, "## Guarantees").into_iter().filter(|(_, l)| l.starts_with("| ")) {
        let Some(proof) = row.trim_end_matches(" |").rsplit(" | ").next() else { continue };
        let Some((file, test)) = proof.trim_matches('`').split_once("::") else { continue };
        let source = read(&format!("tests/{file}"));
        assert!(
            source.contains(&format!("fn {test}(")),
            "README.md's guarantees cite `{test}` in tests/{file}, which has no such test"
        );
        cited += 1;
    }
    assert!(cited >= 30, "the guarantees table cites {cited} tests; expected one per guarantee");
}

#[test]
fn the_readme_opens_with_the_two_commands() {
    let readme = read("README.md");
    let opening: Vec<&str> = readme.lines().skip(2).take(4).collect();
    assert_eq!(
        opening,
        [
            "```sh",
            "cargo run --example quickstart   # the main example: embedded, no servers needed",
            "bash scripts/test.sh             # every test; starts PostgreSQL and nats-server on loopback if needed",
            "```",
        ],
        "CI and reviewers rely on README.md's first lines"
    );
}
