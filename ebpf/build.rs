// Rebuild the kernel programs when the linker changes (it is not a cargo dependency).
fn main() {
    let bpf_linker =
        which::which("bpf-linker").expect("bpf-linker not on PATH: run scripts/setup.sh");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
