//! The SDK's public surface, as plugin authors see it, against a checked-in snapshot
//! (`plugin-abi/sdk-api.txt`): one line per public item, field, variant, method and trait impl
//! of `channeld_plugin_abi::sdk` and the `export_plugin!` macro, made from nightly rustdoc's JSON.
//! A changed signature, a removed item or a dropped derive fails here, so a change to what
//! authors compile against is always deliberate. Items hidden from the docs (`__private`, the
//! harness's seam) are not part of the surface and not listed.
//!
//! After a deliberate change, update the snapshot and commit it with the change:
//! ```sh
//! UPDATE_SDK_API=1 cargo test -p channeld --test integration sdk_api
//! ```

use std::{collections::BTreeSet, fs, path::PathBuf, process::Command};

use serde_json::{Map, Value};

use crate::util;

const SNAPSHOT: &str = "plugin-abi/sdk-api.txt";

/// Builds the crate's rustdoc JSON with `cargo +nightly` (in the nightly target directory the
/// nightly-built fixture uses) and returns it.
fn rustdoc_json() -> Value {
    let target = util::target_dir().join("nightly");
    let out = Command::new("cargo")
        .args([
            "+nightly",
            "rustdoc",
            "-p",
            "channeld-plugin-abi",
            "--lib",
            "--quiet",
            "--",
            "-Z",
            "unstable-options",
            "--output-format",
            "json",
        ])
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTDOCFLAGS")
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(util::workspace_root())
        .output()
        .expect("run cargo +nightly rustdoc");
    assert!(
        out.status.success(),
        "this test needs the nightly toolchain (`rustup toolchain install nightly`; it never \
         skips): cargo +nightly rustdoc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path: PathBuf = target.join("doc/channeld_plugin_abi.json");
    serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap()
}

/// Turns rustdoc's JSON into sorted lines of Rust-like text.
struct Lister<'a> {
    index: &'a Map<String, Value>,
    lines: BTreeSet<String>,
}

impl<'a> Lister<'a> {
    fn item(&self, id: &Value) -> Option<&'a Value> {
        self.index.get(&id.to_string())
    }

    fn module(&mut self, path: &str, module: &Value) {
        for id in module["inner"]["module"]["items"].as_array().unwrap() {
            let Some(item) = self.item(id) else { continue };
            if item["visibility"] != "public" {
                continue;
            }
            let inner = item["inner"].as_object().unwrap();
            if let Some(import) = inner.get("use") {
                let name = import["name"].as_str().unwrap();
                let target = import["id"].as_u64().and_then(|id| self.item(&id.into()));
                match target {
                    // A re-export of the SDK's own item: listed under the re-exported path.
                    Some(target) if !path.ends_with("prelude") => {
                        self.named(&format!("{path}::{name}"), target)
                    }
                    _ => {
                        let glob = if import["is_glob"] == true { "::*" } else { "" };
                        self.lines.insert(format!(
                            "pub use {path}::{name} = {}{glob}",
                            import["source"].as_str().unwrap()
                        ));
                    }
                }
            } else {
                let name = item["name"].as_str().unwrap_or_default();
                self.named(&format!("{path}::{name}"), item);
            }
        }
    }

    fn named(&mut self, path: &str, item: &Value) {
        let index = self.index;
        let inner = item["inner"].as_object().unwrap();
        let (kind, body) = inner.iter().next().unwrap();
        match kind.as_str() {
            "module" => {
                self.lines.insert(format!("pub mod {path}"));
                self.module(path, item);
            }
            "struct" => {
                let generics = generics(&body["generics"]);
                self.lines.insert(format!("pub struct {path}{generics}"));
                if let Some(fields) = body["kind"]["plain"]["fields"].as_array() {
                    for field in fields.iter().filter_map(|f| lookup(index, f)) {
                        self.lines.insert(format!(
                            "pub {path}::{}: {}",
                            field["name"].as_str().unwrap(),
                            ty(&field["inner"]["struct_field"])
                        ));
                    }
                }
                self.impls(path, &body["impls"]);
            }
            "enum" => {
                self.lines
                    .insert(format!("pub enum {path}{}", generics(&body["generics"])));
                for variant in body["variants"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|v| lookup(index, v))
                {
                    let fields = &variant["inner"]["variant"]["kind"];
                    let shape = match fields.get("tuple").and_then(Value::as_array) {
                        Some(ids) => format!(
                            "({})",
                            ids.iter()
                                .filter_map(|id| lookup(index, id))
                                .map(|f| ty(&f["inner"]["struct_field"]))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        None => String::new(),
                    };
                    self.lines.insert(format!(
                        "pub {path}::{}{shape}",
                        variant["name"].as_str().unwrap()
                    ));
                }
                self.impls(path, &body["impls"]);
            }
            "trait" => {
                let bounds = match bounds(&body["bounds"]) {
                    b if b.is_empty() => b,
                    b => format!(": {b}"),
                };
                self.lines.insert(format!(
                    "pub trait {path}{}{bounds}",
                    generics(&body["generics"])
                ));
                for member in body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|i| lookup(index, i))
                {
                    self.member(path, member, true);
                }
            }
            "function" => {
                let name = path.rsplit("::").next().unwrap();
                let prefix = &path[..path.len() - name.len()];
                self.lines
                    .insert(format!("{prefix}{}", function(name, body, "pub ")));
            }
            "constant" => {
                self.lines.insert(format!(
                    "pub const {path}: {} = {}",
                    ty(&body["type"]),
                    body["const"]["expr"].as_str().unwrap_or_default()
                ));
            }
            "type_alias" => {
                self.lines.insert(format!(
                    "pub type {path}{} = {}",
                    generics(&body["generics"]),
                    ty(&body["type"])
                ));
            }
            "macro" => {
                self.lines.insert(format!("macro {path}!"));
            }
            other => {
                self.lines.insert(format!("{other} {path}"));
            }
        }
    }

    fn member(&mut self, path: &str, member: &Value, in_trait: bool) {
        let name = member["name"].as_str().unwrap_or_default();
        let inner = member["inner"].as_object().unwrap();
        let (kind, body) = inner.iter().next().unwrap();
        let visibility = if in_trait { "" } else { "pub " };
        let default = |has: bool| if has && in_trait { " {default}" } else { "" };
        let deprecated = if member["deprecation"].is_null() {
            ""
        } else {
            "#[deprecated] "
        };
        let line = match kind.as_str() {
            "function" => format!(
                "{deprecated}{path}::{}{}",
                function(name, body, visibility),
                default(body["has_body"] == true)
            ),
            "assoc_const" => format!(
                "{path}::const {name}: {}{}",
                ty(&body["type"]),
                default(!body["value"].is_null())
            ),
            "assoc_type" => format!("{path}::type {name}"),
            other => format!("{path}::{other} {name}"),
        };
        self.lines.insert(line);
    }

    fn impls(&mut self, path: &str, impls: &Value) {
        let index = self.index;
        for imp in impls
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| lookup(index, i))
        {
            let body = &imp["inner"]["impl"];
            if body["is_synthetic"] == true || !body["blanket_impl"].is_null() {
                continue;
            }
            match body["trait"].as_object() {
                None => {
                    for member in body["items"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|i| lookup(index, i))
                        .filter(|m| m["visibility"] == "public")
                    {
                        self.member(path, member, false);
                    }
                }
                Some(_) => {
                    self.lines.insert(format!(
                        "impl{} {} for {}",
                        generics(&body["generics"]),
                        path_of(&body["trait"]),
                        ty(&body["for"])
                    ));
                }
            }
        }
    }
}

fn lookup<'a>(index: &'a Map<String, Value>, id: &Value) -> Option<&'a Value> {
    index.get(&id.to_string())
}

fn function(name: &str, body: &Value, visibility: &str) -> String {
    let header = &body["header"];
    let asyncness = if header["is_async"] == true {
        "async "
    } else {
        ""
    };
    let inputs = body["sig"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|input| {
            let (arg, t) = (input[0].as_str().unwrap(), &input[1]);
            match (arg, t) {
                ("self", Value::Object(o)) if o.get("generic") == Some(&"Self".into()) => {
                    "self".to_owned()
                }
                ("self", _) => match t.get("borrowed_ref") {
                    Some(r) if r["type"]["generic"] == "Self" => {
                        format!("&{}self", if r["is_mutable"] == true { "mut " } else { "" })
                    }
                    _ => format!("self: {}", ty(t)),
                },
                _ => format!("{arg}: {}", ty(t)),
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let output = match &body["sig"]["output"] {
        Value::Null => String::new(),
        t => format!(" -> {}", ty(t)),
    };
    format!(
        "{visibility}{asyncness}fn {name}{}({inputs}){output}{}",
        generics(&body["generics"]),
        where_clause(&body["generics"])
    )
}

fn generics(generics: &Value) -> String {
    let params: Vec<String> = generics["params"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"]["type"]["is_synthetic"] != true)
        .map(|p| {
            let name = p["name"].as_str().unwrap().to_owned();
            let kind = &p["kind"];
            if let Some(t) = kind.get("type") {
                let b = bounds(&t["bounds"]);
                if b.is_empty() {
                    name
                } else {
                    format!("{name}: {b}")
                }
            } else if let Some(c) = kind.get("const") {
                format!("const {name}: {}", ty(&c["type"]))
            } else {
                name
            }
        })
        .collect();
    if params.is_empty() {
        String::new()
    } else {
        format!("<{}>", params.join(", "))
    }
}

fn where_clause(generics: &Value) -> String {
    let predicates: Vec<String> = generics["where_predicates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| match p.get("bound_predicate") {
            Some(b) => format!("{}: {}", ty(&b["type"]), bounds(&b["bounds"])),
            None => compact(p),
        })
        .collect();
    if predicates.is_empty() {
        String::new()
    } else {
        format!(" where {}", predicates.join(", "))
    }
}

fn bounds(bounds: &Value) -> String {
    bounds
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            if let Some(t) = b.get("trait_bound") {
                let modifier = if t["modifier"] == "maybe" { "?" } else { "" };
                format!("{modifier}{}", path_of(&t["trait"]))
            } else if let Some(l) = b.get("outlives") {
                l.as_str().unwrap_or_default().to_owned()
            } else {
                compact(b)
            }
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

fn path_of(path: &Value) -> String {
    format!(
        "{}{}",
        path["path"].as_str().unwrap_or_default(),
        generic_args(&path["args"])
    )
}

fn generic_args(args: &Value) -> String {
    if let Some(angle) = args.get("angle_bracketed") {
        let mut all: Vec<String> = angle["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                if let Some(t) = a.get("type") {
                    ty(t)
                } else if let Some(l) = a.get("lifetime") {
                    l.as_str().unwrap_or_default().to_owned()
                } else {
                    compact(a)
                }
            })
            .collect();
        for c in angle["constraints"].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or_default();
            if let Some(t) = c["binding"].get("equality").and_then(|e| e.get("type")) {
                all.push(format!("{name} = {}", ty(t)));
            } else {
                all.push(format!("{name}: {}", bounds(&c["binding"]["constraint"])));
            }
        }
        if all.is_empty() {
            String::new()
        } else {
            format!("<{}>", all.join(", "))
        }
    } else if let Some(paren) = args.get("parenthesized") {
        let inputs: Vec<String> = paren["inputs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(ty)
            .collect();
        let output = match &paren["output"] {
            Value::Null => String::new(),
            t => format!(" -> {}", ty(t)),
        };
        format!("({}){output}", inputs.join(", "))
    } else {
        String::new()
    }
}

fn ty(t: &Value) -> String {
    let Some((kind, v)) = t.as_object().and_then(|o| o.iter().next()) else {
        return compact(t);
    };
    match kind.as_str() {
        "resolved_path" => path_of(v),
        "primitive" | "generic" => v.as_str().unwrap_or_default().to_owned(),
        "borrowed_ref" => format!(
            "&{}{}{}",
            v["lifetime"]
                .as_str()
                .map(|l| format!("{l} "))
                .unwrap_or_default(),
            if v["is_mutable"] == true { "mut " } else { "" },
            ty(&v["type"])
        ),
        "tuple" => format!(
            "({})",
            v.as_array()
                .unwrap()
                .iter()
                .map(ty)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "slice" => format!("[{}]", ty(v)),
        "array" => format!("[{}; {}]", ty(&v["type"]), v["len"].as_str().unwrap_or("?")),
        "impl_trait" => format!("impl {}", bounds(v)),
        "dyn_trait" => format!(
            "dyn {}",
            v["traits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| path_of(&p["trait"]))
                .collect::<Vec<_>>()
                .join(" + ")
        ),
        "qualified_path" => format!(
            "<{} as {}>::{}",
            ty(&v["self_type"]),
            path_of(&v["trait"]),
            v["name"].as_str().unwrap_or_default()
        ),
        "raw_pointer" => format!(
            "*{} {}",
            if v["is_mutable"] == true {
                "mut"
            } else {
                "const"
            },
            ty(&v["type"])
        ),
        _ => compact(t),
    }
}

/// JSON for shapes the lister does not spell out, without rustdoc's build-specific ids.
fn compact(value: &Value) -> String {
    fn strip(value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, _)| k.as_str() != "id")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    strip(value).to_string()
}

/// The listing of the SDK's public surface.
fn listing(doc: &Value) -> String {
    let index = doc["index"].as_object().unwrap();
    let root = &index[&doc["root"].to_string()];
    let mut lister = Lister {
        index,
        lines: BTreeSet::new(),
    };
    for id in root["inner"]["module"]["items"].as_array().unwrap() {
        let Some(item) = lister.item(id) else {
            continue;
        };
        match item["name"].as_str() {
            Some("sdk") => lister.named("sdk", item),
            Some("export_plugin") => lister.named("export_plugin", item),
            _ => {}
        }
    }
    let mut text = format!(
        "# The public surface of channeld_plugin_abi::sdk (rustdoc JSON format {}).\n\
         # Generated: UPDATE_SDK_API=1 cargo test -p channeld --test integration sdk_api\n",
        doc["format_version"]
    );
    for line in lister.lines {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

#[test]
fn the_sdk_public_api_matches_its_snapshot() {
    let listing = listing(&rustdoc_json());
    let path = util::workspace_root().join(SNAPSHOT);
    if std::env::var_os("UPDATE_SDK_API").is_some() {
        fs::write(&path, &listing).unwrap();
        return;
    }
    let snapshot = fs::read_to_string(&path).unwrap_or_default();
    // The format line changes with nightly, not with the SDK.
    let body = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    let (old, new) = (body(&snapshot), body(&listing));
    let removed: Vec<_> = old.iter().filter(|l| !new.contains(l)).collect();
    let added: Vec<_> = new.iter().filter(|l| !old.contains(l)).collect();
    assert!(
        removed.is_empty() && added.is_empty(),
        "the SDK's public API changed (plugin authors compile against it):\n\
         removed:\n  {}\nadded:\n  {}\nif this is deliberate, update the snapshot and commit it:\n  \
         UPDATE_SDK_API=1 cargo test -p channeld --test integration sdk_api",
        removed
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
        added
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}
