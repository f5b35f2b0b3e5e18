//! `waygate rules check|eval`: validate Cloudflare-format rules and evaluate them against one flow.
//!
//! `check` prints every error (and warning) on stderr as `FILE: rule N "name" (id): key: line L,
//! column C: message` and exits 1 when there is an error. `eval` prints the decision on stdout as
//! `{"matched", "rule_id", "rule_name", "action", "rule_settings"}`; DNS runs the rules decidable
//! before resolution, then those that read the answer.
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;
use waygate_policy::fields::Stage;
use waygate_policy::input::Input;
use waygate_policy::ruleset::{Lists, Policy, RuleError, RuleSet};

use super::RulesCommand;

/// Runs `waygate rules ...`.
pub fn run(cmd: RulesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RulesCommand::Check { file, lists } => check(&file, lists.as_deref()),
        RulesCommand::Eval {
            rules,
            filter,
            input,
            lists,
        } => eval(&rules, &filter, &input, lists.as_deref()),
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Loads and compiles; prints warnings and errors, and returns None when there are errors.
fn load(rules: &Path, lists: Option<&Path>) -> anyhow::Result<Option<(RuleSet, Policy)>> {
    let text = read(rules)?;
    let set = RuleSet::from_json(&text).with_context(|| rules.display().to_string())?;
    let lists = match lists {
        Some(path) => {
            Some(Lists::from_json(&read(path)?).with_context(|| path.display().to_string())?)
        }
        None => None,
    };
    let report = Policy::check(&set, lists.as_ref());
    let print = |kind: &str, e: &RuleError| match file_position(&text, &set, e) {
        Some((line, column)) => eprintln!("{}:{line}:{column}: {kind}{e}", rules.display()),
        None => eprintln!("{}: {kind}{e}", rules.display()),
    };
    report.errors.iter().for_each(|e| print("", e));
    report.warnings.iter().for_each(|w| print("warning: ", w));
    match report.policy {
        Some(policy) => Ok(Some((set, policy))),
        None => {
            let n = report.errors.len();
            eprintln!(
                "{}: {n} error{}",
                rules.display(),
                if n == 1 { "" } else { "s" }
            );
            Ok(None)
        }
    }
}

/// Where in the rules file an expression error is, for editors that jump to `FILE:LINE:COL`:
/// found by locating the expression's JSON string (the first with that text) and counting the
/// escaped characters before the error's position inside it.
fn file_position(text: &str, set: &RuleSet, e: &RuleError) -> Option<(usize, usize)> {
    let pos = e.pos?;
    let rule = set.rules.get(e.index)?;
    let expr = match e.key {
        "traffic" => rule.traffic.get(),
        "identity" => rule.identity.get(),
        "device_posture" => rule.device_posture.get(),
        _ => None,
    }?;
    let start = text.find(&serde_json::to_string(expr).ok()?)?;
    // The expression's lines are joined by escapes inside one line of the file.
    let mut prefix = String::new();
    for (i, line) in expr.split('\n').enumerate() {
        if i + 1 < pos.line as usize {
            prefix.push_str(line);
            prefix.push('\n');
        } else {
            prefix.extend(line.chars().take((pos.column as usize).saturating_sub(1)));
            break;
        }
    }
    let encoded = serde_json::to_string(&prefix).ok()?;
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column =
        before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + encoded.chars().count();
    Some((line, column))
}

fn check(file: &Path, lists: Option<&Path>) -> anyhow::Result<ExitCode> {
    let Some((set, policy)) = load(file, lists)? else {
        return Ok(ExitCode::FAILURE);
    };
    let counts: Vec<String> = Stage::ALL
        .iter()
        .map(|s| format!("{s} {}", policy.stage(*s).rules().len()))
        .collect();
    println!(
        "{}: {} rules OK (enabled: {})",
        file.display(),
        set.rules.len(),
        counts.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct Decision<'a> {
    matched: bool,
    rule_id: Option<&'a str>,
    rule_name: Option<&'a str>,
    action: Option<&'a str>,
    rule_settings: Option<&'a serde_json::Value>,
}

fn eval(
    rules: &Path,
    filter: &str,
    input: &Path,
    lists: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let stage = Stage::parse(filter).with_context(|| {
        format!("unknown filter \"{filter}\" (expected dns, http, l4 or egress)")
    })?;
    let flow: serde_json::Value =
        serde_json::from_str(&read(input)?).with_context(|| input.display().to_string())?;
    let flow = Input::from_json(&flow).with_context(|| input.display().to_string())?;
    let Some((_, policy)) = load(rules, lists)? else {
        return Ok(ExitCode::FAILURE);
    };
    let rule = policy.stage(stage).evaluate(&flow);
    let decision = Decision {
        matched: rule.is_some(),
        rule_id: rule.map(|r| r.id.as_str()),
        rule_name: rule.map(|r| r.name.as_str()),
        action: rule.map(|r| r.action_name.as_str()),
        rule_settings: rule.map(|r| &r.settings),
    };
    println!("{}", serde_json::to_string_pretty(&decision)?);
    Ok(ExitCode::SUCCESS)
}
