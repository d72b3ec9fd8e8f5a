//! Documentation that must stay true: the README's library-mode program is
//! `examples/embed.rs` word for word (the example is built, with warnings
//! denied, by `cargo test` and `cargo clippy --all-targets`).

#[test]
fn the_readme_library_snippet_is_the_compiled_example() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/embed.rs");
    let block = format!("```rust\n{example}```");
    assert!(
        readme.contains(&block),
        "README.md's library-mode block differs from examples/embed.rs: copy the file into it"
    );
}
