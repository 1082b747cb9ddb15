//! What can be checked of the dashboard, alert rules and compose stack without Docker:
//! every metric they use exists in the exporter's output, and every file they mount exists.

use std::collections::BTreeSet;

use serde_yaml_ng::Value as Yaml;

#[path = "support/dashboards.rs"]
mod dashboards;

use dashboards::{alert_rules, dashboard_queries, repo_path as repo, repo_yaml as yaml};

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("loginflow_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The exporter's page with every series registered, as a fresh process serves it.
fn exporter_page() -> String {
    let recorder = loginflow::metrics::prometheus_builder().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, loginflow::metrics::register_all);
    handle.render()
}

#[test]
fn every_dashboard_and_alert_metric_is_exported() {
    let page = exporter_page();
    let exported: BTreeSet<&str> =
        page.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let mut used = BTreeSet::new();
    for (title, expr) in dashboard_queries() {
        let names = metric_names(&expr);
        assert!(!names.is_empty() || expr.contains("up{"), "panel {title:?} queries no loginflow metric: {expr}");
        used.extend(names);
    }
    for (_, expr) in alert_rules() {
        used.extend(metric_names(&expr));
    }
    for name in &used {
        assert!(exported.contains(name.as_str()), "{name} is used by the dashboard or alerts but not exported");
    }
    // The dashboard covers every metric family loginflow exports.
    for family in exported.iter().filter(|n| n.starts_with("loginflow_")) {
        let base = family.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
        assert!(used.iter().any(|u| u.starts_with(base)), "{family} has no panel");
    }
}

#[test]
fn histograms_are_exported_with_buckets() {
    let page = exporter_page();
    for name in
        ["loginflow_batch_size_messages", "loginflow_flush_duration_seconds", "loginflow_end_to_end_latency_seconds"]
    {
        assert!(page.contains(&format!("# TYPE {name} histogram")), "{name} is not a histogram");
        assert!(page.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 0")), "{name} has no buckets");
    }
}

#[test]
fn compose_stack_points_at_files_that_exist() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_mapping().expect("services");
    for name in ["localstack", "postgres", "seed", "loginflow", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    assert!(repo("Dockerfile").is_file());
    assert_eq!(compose["services"]["loginflow"]["build"].as_str(), Some("."));
    let ports: Vec<&str> =
        services.values().filter_map(|s| s["ports"].as_sequence()).flatten().filter_map(Yaml::as_str).collect();
    for port in ["4566:4566", "5432:5432", "9898:9898", "9090:9090", "3000:3000"] {
        assert!(ports.contains(&port), "port {port} not published");
    }
    // Every bind mount's host side exists in the repository.
    let mut mounts = Vec::new();
    for service in services.values() {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let volume = volume.as_str().expect("short volume syntax");
            if let Some(host) = volume.strip_prefix("./") {
                let host = host.split(':').next().unwrap();
                assert!(repo(host).exists(), "{host} is mounted but missing");
                mounts.push(volume.to_owned());
            }
        }
    }
    assert!(mounts.iter().any(|m| m.ends_with(":/etc/prometheus/prometheus.yml:ro")));
    assert!(mounts.iter().any(|m| m.ends_with(":/etc/grafana/provisioning:ro")));

    // Grafana's provider reads dashboards from where compose mounts them; the datasource is the panels' uid.
    let provider = yaml("dashboards/grafana/provisioning/dashboards/loginflow.yml");
    let dashboards_path = provider["providers"][0]["options"]["path"].as_str().unwrap();
    assert!(mounts.iter().any(|m| m == &format!("./dashboards/grafana/dashboards:{dashboards_path}:ro")));
    let datasource = yaml("dashboards/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(datasource["datasources"][0]["uid"].as_str(), Some("prometheus"));
    assert_eq!(datasource["datasources"][0]["url"].as_str(), Some("http://prometheus:9090"));

    // Prometheus scrapes the loginflow service on the port it serves metrics on, and loads the rules.
    let prometheus = yaml("dashboards/prometheus.yml");
    let target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str().unwrap();
    let metrics_addr = compose["services"]["loginflow"]["environment"]["METRICS_ADDR"].as_str().unwrap();
    assert_eq!(target.split(':').nth(1), metrics_addr.split(':').nth(1));
    assert_eq!(prometheus["rule_files"][0].as_str(), Some("alerts.yml"));
    let seed_command = compose["services"]["seed"]["command"].as_sequence().unwrap();
    let sample = seed_command.last().and_then(Yaml::as_str).unwrap();
    assert!(repo(&sample.replace("/app/", "")).is_file(), "seeded sample {sample} is not in the image");
}
