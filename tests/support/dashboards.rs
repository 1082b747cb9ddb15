//! Reads the PromQL out of the shipped dashboard and alert rules (shared by two test binaries).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// A path inside the repository.
pub fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

pub fn read_repo_file(path: &str) -> String {
    let full = repo_path(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

pub fn repo_yaml(path: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&read_repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `(panel title, expr)` for every query of every dashboard panel.
pub fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&read_repo_file("dashboards/grafana/dashboards/loginflow.json")).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push((panel["title"].as_str().unwrap().to_owned(), target["expr"].as_str().unwrap().to_owned()));
        }
    }
    queries
}

/// `(alert name, expr)` for every alert rule.
pub fn alert_rules() -> Vec<(String, String)> {
    let alerts = repo_yaml("dashboards/alerts.yml");
    let mut rules = Vec::new();
    for group in alerts["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            rules.push((rule["alert"].as_str().unwrap().to_owned(), rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    rules
}
