//! Writes every mgpu command's man page and shell completions under DIR (laid out as
//! `/usr/local/share`): `cargo run --release -p mgpu --example gen-docs -- DIR`.

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: gen-docs DIR"))?;
    let files = mgpu::write_docs(std::path::Path::new(&dir))?;
    eprintln!(
        "gen-docs: {} files under {}",
        files.len(),
        dir.to_string_lossy()
    );
    Ok(())
}
