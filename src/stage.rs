//! Stages the Functions app folder: the host finds function folders only directly under the app
//! root, while the repository keeps them under `functions/`. Also checks a staged folder against
//! the host's rules, so a broken layout fails here rather than silently in Azure.

use serde_json::Value;
use std::{
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("the staged app breaks the host's rules:\n  - {}", .0.join("\n  - "))]
    Rules(Vec<String>),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StageError + '_ {
    move |source| StageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a staged app holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppLayout {
    pub executable: String,
    pub functions: Vec<String>,
}

/// Copies `host.json`, each `functions/<Name>/` folder and `binary` (to the host's
/// `defaultExecutablePath`) into `out`, replacing an earlier staging there. A local
/// `local.settings.json` is copied for `func start`, and `.funcignore` keeps it out of deployments.
pub fn stage(source: &Path, out: &Path, binary: &Path) -> Result<AppLayout, StageError> {
    let host_path = source.join("host.json");
    let host: Value = read_json(&host_path)?;
    let exe = executable_path(&host)
        .ok_or_else(|| {
            StageError::Invalid(format!(
                "{}: customHandler.description.defaultExecutablePath is missing",
                host_path.display()
            ))
        })?
        .to_owned();

    if out.exists() {
        let safe =
            out.join("host.json").exists() || fs::read_dir(out).map_err(io(out))?.next().is_none();
        if !safe {
            return Err(StageError::Invalid(format!(
                "{} exists and is not a staged app; refusing to replace it",
                out.display()
            )));
        }
        fs::remove_dir_all(out).map_err(io(out))?;
    }
    fs::create_dir_all(out).map_err(io(out))?;
    fs::copy(&host_path, out.join("host.json")).map_err(io(&host_path))?;

    let functions_dir = source.join("functions");
    let mut entries: Vec<_> = fs::read_dir(&functions_dir)
        .map_err(io(&functions_dir))?
        .collect::<Result<_, _>>()
        .map_err(io(&functions_dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let from = entry.path();
        if !from.join("function.json").is_file() {
            continue;
        }
        let to = out.join(entry.file_name());
        fs::create_dir_all(&to).map_err(io(&to))?;
        for file in fs::read_dir(&from).map_err(io(&from))? {
            let file = file.map_err(io(&from))?;
            if file.path().is_file() {
                fs::copy(file.path(), to.join(file.file_name())).map_err(io(&file.path()))?;
            }
        }
    }

    let exe_path = out.join(&exe);
    fs::copy(binary, &exe_path).map_err(io(binary))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&exe_path, fs::Permissions::from_mode(0o755)).map_err(io(&exe_path))?;
    }
    let local_settings = source.join("local.settings.json");
    if local_settings.is_file() {
        fs::copy(&local_settings, out.join("local.settings.json")).map_err(io(&local_settings))?;
    }
    fs::write(out.join(".funcignore"), "local.settings.json\n").map_err(io(out))?;
    validate(out)
}

/// Checks a staged app folder against the rules the Functions host applies.
pub fn validate(app: &Path) -> Result<AppLayout, StageError> {
    let mut problems = Vec::new();
    let host: Value = read_json(&app.join("host.json"))?;
    if host.get("version").and_then(Value::as_str) != Some("2.0") {
        problems.push("host.json: \"version\" must be \"2.0\"".to_owned());
    }
    let bundle = &host["extensionBundle"];
    if bundle["id"] != "Microsoft.Azure.Functions.ExtensionBundle" {
        problems.push(
            "host.json: extensionBundle.id must be Microsoft.Azure.Functions.ExtensionBundle"
                .into(),
        );
    }
    if bundle["version"].as_str().is_none() {
        problems.push("host.json: extensionBundle.version is missing".into());
    }
    let exe = executable_path(&host).unwrap_or_default().to_owned();
    if exe.is_empty() {
        problems
            .push("host.json: customHandler.description.defaultExecutablePath is missing".into());
    } else {
        let path = app.join(&exe);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    if m.permissions().mode() & 0o111 == 0 {
                        problems.push(format!("{exe}: not executable"));
                    }
                }
            }
            _ => problems.push(format!(
                "{exe}: the handler executable is not in the app root"
            )),
        }
    }

    let mut functions = Vec::new();
    for entry in fs::read_dir(app).map_err(io(app))? {
        let entry = entry.map_err(io(app))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let fj = path.join("function.json");
        if !fj.is_file() {
            continue;
        }
        if !valid_function_name(&name) {
            problems.push(format!("{name}: not a valid function name"));
        }
        let def: Value = read_json(&fj)?;
        let bindings = def["bindings"].as_array().cloned().unwrap_or_default();
        if bindings.is_empty() {
            problems.push(format!("{name}/function.json: needs at least one binding"));
        }
        for b in &bindings {
            let bname = b["name"].as_str().unwrap_or_default();
            if !valid_binding_name(bname) {
                problems.push(format!(
                    "{name}/function.json: binding name {bname:?} is invalid"
                ));
            }
            if b["type"].as_str().is_none() || b["direction"].as_str().is_none() {
                problems.push(format!(
                    "{name}/function.json: binding {bname:?} needs type and direction"
                ));
            }
            if b["type"] == "queueTrigger"
                && (b["queueName"].as_str().is_none() || b["connection"].as_str().is_none())
            {
                problems.push(format!(
                    "{name}/function.json: queueTrigger needs queueName and connection"
                ));
            }
        }
        functions.push(name);
    }
    functions.sort();
    if functions.is_empty() {
        problems.push("no function folder (with function.json) directly under the app root".into());
    }
    if problems.is_empty() {
        Ok(AppLayout {
            executable: exe,
            functions,
        })
    } else {
        Err(StageError::Rules(problems))
    }
}

fn executable_path(host: &Value) -> Option<&str> {
    host["customHandler"]["description"]["defaultExecutablePath"]
        .as_str()
        .filter(|s| !s.is_empty())
}

fn read_json(path: &Path) -> Result<Value, StageError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text)
        .map_err(|e| StageError::Invalid(format!("{}: not valid JSON: {e}", path.display())))
}

/// `^[a-z][a-z0-9_\-]{0,127}$`, case-insensitive.
pub fn valid_function_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `^[a-zA-Z][a-zA-Z0-9]{0,127}$` or `$return`.
pub fn valid_binding_name(name: &str) -> bool {
    if name == "$return" {
        return true;
    }
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_hosts_patterns() {
        assert!(valid_function_name("CustomVisionNotification"));
        assert!(valid_function_name("a_b-c"));
        assert!(!valid_function_name("1abc"));
        assert!(!valid_function_name("a.b"));
        assert!(valid_binding_name("notification"));
        assert!(valid_binding_name("$return"));
        assert!(!valid_binding_name("my_item"));
        assert!(!valid_binding_name("my-item"));
    }
}
