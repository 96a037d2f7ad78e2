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
    #[error("{path}: {source} (delete it and package again)")]
    Zip {
        path: PathBuf,
        source: zip::result::ZipError,
    },
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

/// One file or folder in a packaged app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipEntry {
    /// The path inside the zip, `/`-separated; folders end with `/`.
    pub name: String,
    /// The Unix permission bits stored in the entry's external attributes.
    pub mode: u32,
    pub size: u64,
}

/// Writes the staged app folder `app` as the zip that zip deploy and Flex Consumption's
/// one-deploy take, with the handler stored as mode 0755 (zip deploy keeps the mode bits it
/// finds, and a handler without them cannot start) and everything `.funcignore` names left out.
/// Entries are sorted and dated 1980-01-01, so the same folder always gives the same zip. The
/// zip is read back and checked before it replaces an earlier one at `zip_path`.
pub fn package(app: &Path, zip_path: &Path) -> Result<Vec<ZipEntry>, StageError> {
    let layout = validate(app)?;
    let ignored = read_funcignore(app)?;
    let mut files = Vec::new();
    collect(app, "", &mut files)?;
    files.retain(|(rel, _)| !is_ignored(rel, &ignored));

    if let Some(parent) = zip_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let partial = zip_path.with_extension("zip.partial");
    let zip_err = |path: &Path| {
        let path = path.to_owned();
        move |source| StageError::Zip { path, source }
    };
    let file = fs::File::create(&partial).map_err(io(&partial))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default());
    for (rel, path) in &files {
        if path.is_dir() {
            zip.add_directory(rel.as_str(), options.unix_permissions(0o755))
                .map_err(zip_err(&partial))?;
            continue;
        }
        let mode = if *rel == layout.executable {
            0o755
        } else {
            0o644
        };
        zip.start_file(rel.as_str(), options.unix_permissions(mode))
            .map_err(zip_err(&partial))?;
        let mut src = fs::File::open(path).map_err(io(path))?;
        std::io::copy(&mut src, &mut zip).map_err(io(path))?;
    }
    let mut out = zip.finish().map_err(zip_err(&partial))?;
    std::io::Write::flush(&mut out).map_err(io(&partial))?;
    drop(out);
    let (_, entries) = inspect_zip(&partial)?;
    fs::rename(&partial, zip_path).map_err(io(zip_path))?;
    Ok(entries)
}

/// Reads a packaged app back and checks what the host needs of it: `host.json`, at least one
/// `<Name>/function.json`, the handler at `defaultExecutablePath` with its execute bits, a
/// `.funcignore`, and no `local.settings.json` (it holds local secrets).
pub fn inspect_zip(zip_path: &Path) -> Result<(AppLayout, Vec<ZipEntry>), StageError> {
    let zip_err = |source| StageError::Zip {
        path: zip_path.to_owned(),
        source,
    };
    let file = fs::File::open(zip_path).map_err(io(zip_path))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(zip_err)?;
    let mut entries = Vec::new();
    let mut host = None;
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).map_err(zip_err)?;
        let name = f.name().map_err(zip_err)?.into_owned();
        if name == "host.json" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut f, &mut text).map_err(io(zip_path))?;
            host = Some(serde_json::from_str::<Value>(&text).map_err(|e| {
                StageError::Invalid(format!(
                    "{}: host.json is not valid JSON: {e}",
                    zip_path.display()
                ))
            })?);
        }
        entries.push(ZipEntry {
            mode: f.unix_mode().unwrap_or(0) & 0o777,
            size: f.size(),
            name,
        });
    }

    let mut problems = Vec::new();
    let exe = host
        .as_ref()
        .and_then(executable_path)
        .unwrap_or_default()
        .to_owned();
    if host.is_none() {
        problems.push("host.json: not at the root of the zip".to_owned());
    } else if exe.is_empty() {
        problems
            .push("host.json: customHandler.description.defaultExecutablePath is missing".into());
    } else {
        match entries.iter().find(|e| e.name == exe) {
            Some(e) if e.mode & 0o111 == 0o111 => {}
            Some(e) => problems.push(format!(
                "{exe}: stored with mode {:o}; the handler needs 755",
                e.mode
            )),
            None => problems.push(format!("{exe}: the handler is not at the root of the zip")),
        }
    }
    let mut functions: Vec<String> = entries
        .iter()
        .filter_map(|e| e.name.strip_suffix("/function.json"))
        .filter(|dir| !dir.contains('/'))
        .map(str::to_owned)
        .collect();
    functions.sort();
    if functions.is_empty() {
        problems.push("no <Name>/function.json at the root of the zip".into());
    }
    for name in functions.iter().filter(|n| !valid_function_name(n)) {
        problems.push(format!("{name}: not a valid function name"));
    }
    if !entries.iter().any(|e| e.name == ".funcignore") {
        problems.push(".funcignore: missing".into());
    }
    if entries
        .iter()
        .any(|e| e.name.rsplit('/').next() == Some("local.settings.json"))
    {
        problems.push("local.settings.json: must never be deployed (local secrets)".into());
    }
    if problems.is_empty() {
        Ok((
            AppLayout {
                executable: exe,
                functions,
            },
            entries,
        ))
    } else {
        Err(StageError::Rules(problems))
    }
}

/// Every file and folder under `dir`, sorted, as (`/`-separated relative path, path); folders
/// get a trailing `/`, as zip entries do.
fn collect(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> Result<(), StageError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_dir() {
            let rel = format!("{prefix}{name}/");
            out.push((rel.clone(), path.clone()));
            collect(&path, &rel, out)?;
        } else {
            out.push((format!("{prefix}{name}"), path));
        }
    }
    Ok(())
}

/// The names `.funcignore` lists. Only plain names and paths are supported (no globs or
/// negations), which is all `stage` writes.
fn read_funcignore(app: &Path) -> Result<Vec<String>, StageError> {
    let path = app.join(".funcignore");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_owned())
        .collect())
}

/// A pattern without `/` matches that name at any depth; one with `/` matches from the root.
fn is_ignored(rel: &str, ignored: &[String]) -> bool {
    let rel = rel.trim_end_matches('/');
    ignored.iter().any(|pattern| {
        if pattern.contains('/') {
            rel == pattern || rel.starts_with(&format!("{pattern}/"))
        } else {
            rel.split('/').any(|part| part == pattern)
        }
    })
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
            if b["type"] == "timerTrigger" && !valid_schedule(b["schedule"].as_str()) {
                problems.push(format!(
                    "{name}/function.json: timerTrigger needs a schedule: six NCRONTAB fields ({{second}} {{minute}} {{hour}} {{day}} {{month}} {{day-of-week}}) or %Setting%"
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

/// A timer schedule the host accepts: NCRONTAB with six fields, or an app setting's name.
fn valid_schedule(schedule: Option<&str>) -> bool {
    let Some(s) = schedule.map(str::trim) else {
        return false;
    };
    if s.len() > 2 && s.starts_with('%') && s.ends_with('%') {
        return true;
    }
    let fields: Vec<&str> = s.split_whitespace().collect();
    fields.len() == 6
        && fields.iter().all(|f| {
            f.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '*' | '/' | ',' | '-'))
        })
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
    fn funcignore_names_match_at_any_depth_and_paths_from_the_root() {
        let ignored = vec!["local.settings.json".to_owned(), "tmp/cache".to_owned()];
        assert!(is_ignored("local.settings.json", &ignored));
        assert!(is_ignored("Fn/local.settings.json", &ignored));
        assert!(is_ignored("tmp/cache/", &ignored));
        assert!(is_ignored("tmp/cache/x", &ignored));
        assert!(!is_ignored("tmp/cachex", &ignored));
        assert!(!is_ignored("host.json", &ignored));
    }

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
