// Rebuild the object when the shared ABI changes: aya-build runs this crate's build from
// the agent's build.rs, and cargo only tracks what this script names.
fn main() {
    println!("cargo:rerun-if-changed=../common/src");
    println!("cargo:rerun-if-changed=src");
}
