//! For handler authors: `kiln check FILE.wasm` tells whether Kiln can serve a component, before
//! any deploy: its size, its imports against Kiln's allow-list, its export, and whether it
//! compiles and links against Kiln's host interfaces.

use std::path::Path;

use anyhow::Context as _;

use crate::sandbox::{self, Sandbox, SlotResetPolicy, preinit};

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

/// What `kiln new` can start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// Rows of numbers as JSON in, scores and the best class out (the bundled `digits` model).
    Json,
    /// A PNG in, the best class out (the bundled `digits` model).
    Image,
    /// Texts as JSON in, one sentence vector each out (the bundled `minilm` model).
    Text,
}

impl Template {
    fn name(self) -> &'static str {
        match self {
            Template::Json => "json",
            Template::Image => "image",
            Template::Text => "text",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Template::Json => include_str!("../../templates/json/lib.rs"),
            Template::Image => include_str!("../../templates/image/lib.rs"),
            Template::Text => include_str!("../../templates/text/lib.rs"),
        }
    }

    /// Dependencies beyond the SDK and serde, pinned to the versions Kiln's own guests build
    /// with (so a machine that built Kiln builds the template offline).
    fn dependencies(self) -> &'static str {
        match self {
            Template::Image => "png = \"0.17\"\n",
            Template::Json | Template::Text => "",
        }
    }

    /// The model it is written for, as a `[[model]]` section for its sample config.
    fn model(self, models: &str) -> (&'static str, String) {
        match self {
            Template::Json | Template::Image => (
                "digits",
                format!(
                    "[[model]]\nname = \"digits\"\npath = \"{models}/digits.pt\"\ndevice = \"cpu\"\n\
                     inputs = [{{ name = \"image\", dtype = \"FP32\", shape = [-1, 1, 8, 8] }}]\n\
                     outputs = [{{ name = \"logits\" }}]\n"
                ),
            ),
            Template::Text => (
                "minilm",
                format!(
                    "[[model]]\nname = \"minilm\"\npath = \"{models}/minilm.pt\"\ndevice = \"cpu\"\ninputs = [\n    \
                     {{ name = \"input_ids\", dtype = \"INT64\", shape = [-1, -1], ragged_dim = 1, pad = 0, min = 0, max = 30521, max_dims = [-1, 512] }},\n    \
                     {{ name = \"attention_mask\", dtype = \"INT64\", shape = [-1, -1], ragged_dim = 1, pad = 0, min = 0, max = 1, max_dims = [-1, 512] }},\n]\n\
                     outputs = [{{ name = \"last_hidden_state\", ragged_dim = 1 }}]\n"
                ),
            ),
        }
    }

    /// Whether its handler opts in to pre-initialisation (`export_handler!(H, init = f)`): then
    /// `kiln build` writes `NAME.initialized.wasm`, the component to serve.
    fn pre_initialised(self) -> bool {
        matches!(self, Template::Text)
    }

    /// A request body for the README's curl line.
    fn example(self) -> &'static str {
        match self {
            Template::Json => "-d '{\"rows\": [[0, 0, 0.5, 1, 1, 0.5, 0, 0, ...64 values]]}'",
            Template::Image => "--data-binary @digit.png",
            Template::Text => "-d '{\"texts\": [\"A man is eating food.\"]}'",
        }
    }
}

/// Where this `kiln` was built from: its SDK and bundled models, when they are still there.
fn kiln_source() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `kiln new NAME`: a standalone handler crate in `dir/NAME`, built with `kiln build` or cargo
/// alone. `sdk` is the `kiln-guest` folder; by default this Kiln's own, else the registry's.
pub fn new_handler(name: &str, template: Template, dir: &Path, sdk: Option<&Path>, vocab: Option<&Path>) -> anyhow::Result<()> {
    crate::deploy::check_name(name).map_err(|e| anyhow::anyhow!("'{name}' cannot name a handler: {e}"))?;
    let root = dir.join(name);
    if root.exists() {
        anyhow::bail!("{} already exists; pick another name or folder", root.display());
    }
    let sdk = match sdk {
        Some(path) => Some(path.canonicalize().with_context(|| format!("--sdk {}", path.display()))?),
        None => kiln_source().join("guest-sdk").canonicalize().ok(),
    };
    let sdk_line = match &sdk {
        Some(path) => format!("kiln-guest = {{ path = {:?} }}", path.display().to_string()),
        None => format!("kiln-guest = \"{}\"", env!("CARGO_PKG_VERSION")),
    };
    let vocab_text = match template {
        Template::Text => {
            let path = match vocab {
                Some(path) => path.to_path_buf(),
                None => kiln_source().join("build/models/minilm-vocab.txt"),
            };
            Some(std::fs::read_to_string(&path).with_context(|| {
                format!("the text template needs the model's vocabulary: cannot read {} (give --vocab FILE)", path.display())
            })?)
        }
        _ => None,
    };
    let models = kiln_source()
        .join("build/models")
        .canonicalize()
        .map_or_else(|_| "models".to_owned(), |p| p.display().to_string());
    let crate_name = name.replace('-', "_");
    let (model_name, model_section) = template.model(&models);
    let component = if template.pre_initialised() { format!("{crate_name}.initialized.wasm") } else { format!("{crate_name}.wasm") };
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{component}}", &component)
            .replace("{{template}}", template.name())
            .replace("{{sdk}}", &sdk_line)
            .replace("{{deps}}", template.dependencies())
            .replace("{{model}}", &model_section)
            .replace("{{model_name}}", model_name)
            .replace("{{example}}", template.example())
    };
    let mut files: Vec<(&str, String)> = vec![
        ("Cargo.toml", fill(include_str!("../../templates/Cargo.toml.in"))),
        (".cargo/config.toml", include_str!("../../templates/config.toml.in").to_owned()),
        (".gitignore", include_str!("../../templates/gitignore.in").to_owned()),
        ("README.md", fill(include_str!("../../templates/README.md.in"))),
        ("kiln.toml", fill(include_str!("../../templates/kiln.toml.in"))),
        ("src/lib.rs", fill(template.source())),
    ];
    if let Some(vocab) = vocab_text {
        files.push(("vocab.txt", vocab));
    }
    for (relative, text) in files {
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("made {} from the {} template", root.display(), template.name());
    println!("next: kiln build {}   (then see its README.md)", root.display());
    Ok(())
}

/// `kiln build [DIR]`: builds the handler crate in `dir` for wasm32-wasip2 in release,
/// pre-initialises it when it asks (its init function may run for `init_timeout`), then
/// [`check`]s the component. Returns its path.
pub fn build(dir: &Path, init_timeout: std::time::Duration) -> anyhow::Result<std::path::PathBuf> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        anyhow::bail!("{} has no Cargo.toml: give the handler crate's folder", dir.display());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--message-format=json-render-diagnostics", "--manifest-path"])
        .arg(&manifest)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo (is it installed, with `rustup target add wasm32-wasip2`?)")?;
    if !output.status.success() {
        anyhow::bail!("cargo build failed ({})", output.status);
    }
    // The cdylib's .wasm, as cargo reports it (wherever its target folder is).
    let component = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["manifest_path"].as_str().map(Path::new) == manifest.canonicalize().ok().as_deref())
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(std::path::PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "wasm"))
        .ok_or_else(|| anyhow::anyhow!("cargo built no .wasm: is the crate a cdylib (crate-type = [\"cdylib\"])?"))?;
    let component = pre_initialise_if_asked(&component, init_timeout)?;
    check(&component)?;
    println!("component: {}", component.display());
    Ok(component)
}

/// When the component exports `wizer-initialize` (kiln-guest's `export_handler!(H, init = f)`),
/// runs it once and writes the pre-initialised component beside cargo's as
/// `NAME.initialized.wasm` (cargo's own file stays as cargo made it), which is returned.
fn pre_initialise_if_asked(component: &Path, timeout: std::time::Duration) -> anyhow::Result<std::path::PathBuf> {
    let bytes = std::fs::read(component).with_context(|| format!("cannot read {}", component.display()))?;
    if !preinit::wants_pre_initialisation(&bytes).map_err(|e| anyhow::anyhow!("{} is not a component: {e}", component.display()))? {
        return Ok(component.to_path_buf());
    }
    let started = std::time::Instant::now();
    let initialized = preinit::pre_initialise(&bytes, timeout).map_err(|e| anyhow::anyhow!("pre-initialising {} failed: {e}", component.display()))?;
    let out = component.with_extension("initialized.wasm");
    crate::files::write_atomic(&out, &initialized).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "pre-initialised: ran `{}` in {} ms, {} -> {}",
        preinit::INIT_EXPORT,
        started.elapsed().as_millis(),
        human_size(bytes.len() as u64),
        human_size(initialized.len() as u64)
    );
    Ok(out)
}
