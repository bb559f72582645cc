//! `sqlx::migrate!` embeds the files under `migrations/` at compile time; this makes
//! Cargo rebuild the crate when one of them changes (sqlx's documented recipe).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
