fn main() {
    std::process::exit(qcow2fs::cli::main());
}
