//! Rebuilds the crate when a migration is added or changed: `embed_migrations!` reads the
//! `migrations` folder at compile time, and Cargo does not otherwise watch it, so a build
//! could embed the migrations of an earlier one.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
