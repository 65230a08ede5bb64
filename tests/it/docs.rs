//! The docs cannot go stale silently: every `cifar-df ...` (or `cargo run --release -- ...`)
//! command in a shell block of README.md and docs/*.md parses with the current binary's
//! command line (every subcommand and flag exists, every value is accepted), and the blocks
//! marked ```` ```sh run ```` run, in order, in an empty folder with `cifar-df` on the PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;

use cifar_df::cli::Cli;

/// A fenced block: the file, the line its first line is on, its info string and its lines.
struct Block {
    file: PathBuf,
    line: usize,
    info: String,
    lines: Vec<String>,
}

fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn blocks(file: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("```") {
            match open.take() {
                Some(b) => out.push(b),
                None => {
                    open = Some(Block {
                        file: file.to_path_buf(),
                        line: i + 2,
                        info: rest.trim().to_string(),
                        lines: Vec::new(),
                    })
                }
            }
        } else if let Some(b) = open.as_mut() {
            b.lines.push(line.to_string());
        }
    }
    out
}

fn is_shell(info: &str) -> bool {
    matches!(
        info.split_whitespace().next(),
        Some("sh" | "bash" | "shell" | "console")
    )
}

/// The words of one shell command line, cut at the first `|`, `;`, `&&`, `||`, `&`, a
/// redirection or a comment; quotes and backslashes as the shell reads them.
fn shell_words(line: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let end_word = |word: &mut String, in_word: &mut bool, cmds: &mut Vec<Vec<String>>| {
        if *in_word {
            cmds.last_mut().unwrap().push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for d in chars.by_ref() {
                    if d == '\'' {
                        break;
                    }
                    word.push(d);
                }
            }
            '"' => {
                in_word = true;
                while let Some(d) = chars.next() {
                    match d {
                        '"' => break,
                        '\\' => {
                            if let Some(&e) = chars.peek() {
                                if matches!(e, '"' | '\\' | '$' | '`') {
                                    word.push(e);
                                    chars.next();
                                    continue;
                                }
                            }
                            word.push('\\');
                        }
                        _ => word.push(d),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(d) = chars.next() {
                    word.push(d);
                }
            }
            '#' if !in_word => break,
            '|' | ';' | '&' => {
                end_word(&mut word, &mut in_word, &mut commands);
                while chars.peek().is_some_and(|&d| d == '|' || d == '&') {
                    chars.next();
                }
                commands.push(Vec::new());
            }
            '>' | '<' => {
                // A redirection: its target is not an argument.
                if word.chars().all(|d| d.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                }
                end_word(&mut word, &mut in_word, &mut commands);
                while chars.peek().is_some_and(|&d| d == '>' || d == '&') {
                    chars.next();
                }
                while chars.peek().is_some_and(|d| d.is_whitespace()) {
                    chars.next();
                }
                while chars.peek().is_some_and(|d| !d.is_whitespace()) {
                    chars.next();
                }
            }
            c if c.is_whitespace() => end_word(&mut word, &mut in_word, &mut commands),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut commands);
    commands
}

/// The `cifar-df` arguments of each command in a shell block (continuation lines joined),
/// with the line each starts on.
fn commands(b: &Block) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut joined = String::new();
    let mut start = b.line;
    for (i, raw) in b.lines.iter().enumerate() {
        let line = raw.trim();
        let line = line.strip_prefix("$ ").unwrap_or(line);
        if joined.is_empty() {
            start = b.line + i;
        }
        if let Some(head) = line.strip_suffix('\\') {
            joined.push_str(head);
            joined.push(' ');
            continue;
        }
        joined.push_str(line);
        for words in shell_words(&joined) {
            // Skip `VAR=value` assignments and wrappers before the command.
            let mut k = 0;
            while k < words.len()
                && (words[k].contains('=') && !words[k].starts_with('-')
                    || matches!(words[k].as_str(), "time" | "env" | "nohup" | "exec"))
            {
                k += 1;
            }
            let w = &words[k.min(words.len())..];
            let args = if w
                .first()
                .is_some_and(|c| c == "cifar-df" || c.ends_with("/cifar-df"))
            {
                Some(w[1..].to_vec())
            } else if w.len() >= 3 && w[..3] == ["cargo", "run", "--release"] {
                w.iter()
                    .position(|a| a == "--")
                    .map(|p| w[p + 1..].to_vec())
            } else {
                None
            };
            if let Some(args) = args {
                out.push((start, args));
            }
        }
        joined.clear();
    }
    out
}

#[test]
fn shell_words_read_as_the_shell_does() {
    assert_eq!(
        shell_words(r#"cifar-df query "select 'a' from \"t\"" --format csv | head -3 # note"#),
        vec![
            vec![
                "cifar-df".to_string(),
                "query".into(),
                r#"select 'a' from "t""#.into(),
                "--format".into(),
                "csv".into()
            ],
            vec!["head".into(), "-3".into()],
        ]
    );
    assert_eq!(
        shell_words("cifar-df stream --port 6100 2>/dev/null &"),
        vec![
            vec![
                "cifar-df".to_string(),
                "stream".into(),
                "--port".into(),
                "6100".into()
            ],
            vec![]
        ]
    );
    let b = Block {
        file: PathBuf::from("x.md"),
        line: 10,
        info: "sh".into(),
        lines: vec![
            "CIFAR_DF_LOG=debug cifar-df train \\".into(),
            "  --data synthetic".into(),
            "cargo run --release -- query 'select 1'".into(),
            "python3 x.py".into(),
        ],
    };
    let c = commands(&b);
    assert_eq!(c.len(), 2);
    assert_eq!(
        c[0],
        (
            10,
            vec!["train".into(), "--data".into(), "synthetic".into()]
        )
    );
    assert_eq!(c[1], (12, vec!["query".into(), "select 1".into()]));
}

#[test]
fn every_documented_command_parses() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for file in doc_files() {
        for b in blocks(&file).iter().filter(|b| is_shell(&b.info)) {
            for (line, args) in commands(b) {
                checked += 1;
                let argv = std::iter::once("cifar-df".to_string()).chain(args.iter().cloned());
                if let Err(e) = Cli::try_parse_from(argv) {
                    use clap::error::ErrorKind;
                    if !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                        let first = e.to_string().lines().next().unwrap_or("").to_string();
                        failures.push(format!(
                            "{}:{line}: cifar-df {}\n    {first}",
                            b.file.display(),
                            args.join(" ")
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} documented commands do not parse:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 50, "only {checked} commands found in the docs");
}

#[test]
fn the_marked_examples_run() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_cifar-df"));
    let path = format!(
        "{}:{}",
        exe.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    for file in doc_files() {
        for b in blocks(&file)
            .iter()
            .filter(|b| b.info.split_whitespace().collect::<Vec<_>>() == ["sh", "run"])
        {
            let dir = tempfile::tempdir().unwrap();
            let script = b
                .lines
                .iter()
                .map(|l| l.replace("cargo run --release --", "cifar-df"))
                .collect::<Vec<_>>()
                .join("\n");
            let out = Command::new("bash")
                .args(["-euo", "pipefail", "-c", &script])
                .current_dir(dir.path())
                .env("PATH", &path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}:{}: the example failed\n{script}\n--- stdout\n{}\n--- stderr\n{}",
                b.file.display(),
                b.line,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 3, "only {ran} marked examples");
}

/// The `--flag`s a usage cell names (`` `cifar-df train [--data DIR] ...` ``).
fn usage_flags(cell: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = cell.as_bytes();
    let mut i = 0;
    while i + 2 < b.len() {
        if &b[i..i + 2] == b"--" && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            let mut j = i + 2;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'-') {
                j += 1;
            }
            if j > i + 2 {
                out.push(cell[i + 2..j].to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn every_flag_of_the_commands_table_exists() {
    use clap::CommandFactory;
    let cli = Cli::command();
    let globals: Vec<String> = cli
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let mut rows = 0;
    let mut failures = Vec::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let Some(cell) = line.strip_prefix("| `cifar-df ") else {
                continue;
            };
            let cell = cell.split("` |").next().unwrap_or(cell);
            let name = cell.split_whitespace().next().unwrap_or("");
            let Some(sub) = cli.find_subcommand(name) else {
                failures.push(format!("{}:{}: no command {name:?}", file.display(), n + 1));
                continue;
            };
            rows += 1;
            let longs: Vec<String> = sub
                .get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect();
            for flag in usage_flags(cell) {
                if !longs.contains(&flag) && !globals.contains(&flag) && flag != "help" {
                    failures.push(format!(
                        "{}:{}: cifar-df {name} has no --{flag}",
                        file.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(rows >= 12, "only {rows} commands in the tables");
}
