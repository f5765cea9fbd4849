//! For handler authors: `kiln check FILE.wasm` tells whether Kiln can serve a component, before
//! any deploy: its size, its imports against Kiln's allow-list, its export, and whether it
//! compiles and links against Kiln's host interfaces.

use std::path::Path;

use anyhow::Context as _;

use crate::sandbox::{self, Sandbox, SlotResetPolicy};

/// What `kiln check` found: printed as it is, and `Err` when Kiln would refuse the component.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    println!("{}: {}", path.display(), human_size(bytes.len() as u64));
    let (imports, exports) =
        sandbox::component_interface(&bytes).map_err(|e| anyhow::anyhow!("{} is not a component: {e}", path.display()))?;
    let forbidden = sandbox::forbidden_imports(imports.iter().map(String::as_str));
    println!("imports ({}):", imports.len());
    for import in &imports {
        let mark = if forbidden.contains(import) { "refused" } else { "ok" };
        println!("  {mark:>7}  {import}");
    }
    println!("exports ({}):", exports.len());
    for export in &exports {
        println!("           {export}");
    }
    // The same checks a deploy makes, in the same order: interface, compile, link.
    let sandbox = Sandbox::new(1, 64 << 20, false, SlotResetPolicy::Auto)
        .map_err(|e| anyhow::anyhow!("cannot create the sandbox engine: {e}"))?;
    let component = sandbox
        .check_component(&bytes)
        .map_err(|e| anyhow::anyhow!("Kiln would refuse {}: {e}", path.display()))?;
    sandbox
        .check_links(&component)
        .map_err(|e| anyhow::anyhow!("Kiln would refuse {}: {e}", path.display()))?;
    println!("ok: Kiln can serve this component");
    Ok(())
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / f64::from(1 << 10)),
        b => format!("{b} bytes"),
    }
}
