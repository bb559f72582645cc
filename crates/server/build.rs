//! Rebuilds the crate when anything under `ui/` changes: the web app's files are
//! compiled in (rust-embed, `src/ui.rs`), and without this a newly added file would
//! not be picked up until some Rust source changed too.
fn main() {
    println!("cargo:rerun-if-changed=ui");
}
