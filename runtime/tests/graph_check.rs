//! The load-time check of a model's TorchScript, end to end: the real `kiln` binary as the
//! confined checker, on the models `scripts/setup.sh` exports (the shipped ones, which must pass,
//! and the hostile ones of `tests/python/export_test_models.py`, which must be refused by name
//! without running).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{model, root};
use kiln::model::graph_check::{GraphCheck, GraphRefusal, Offence, SUBCOMMAND};

/// What the hostile `__setstate__` creates in the loading process's working directory.
const SETSTATE_TARGET: &str = "kiln-setstate-from-file.created";

fn checker() -> GraphCheck {
    GraphCheck::with_scanner(env!("CARGO_BIN_EXE_kiln"))
}

/// A new empty folder of this test run's.
fn fresh_dir(what: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("kiln-graph-check-{}-{what}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("make a folder");
    dir
}

fn offences(refusal: GraphRefusal) -> Vec<Offence> {
    match refusal {
        GraphRefusal::Operators(list) => list,
        other => panic!("refused for another reason than operators: {other}"),
    }
}

#[test]
fn every_model_kiln_ships_and_tests_with_passes() {
    let shipped = [
        "digits.pt",
        "minilm.pt",
        "resnet18.pt",
        "tokenwise.pt",
        "positions.pt",
        "positions-frozen.pt",
        "normed.pt",
        "unmasked.pt",
        "offset-1.pt",
        "offset-2.pt",
        "offset-3.pt",
    ];
    let check = checker();
    let failed: Vec<String> = shipped
        .iter()
        .filter_map(|name| check.check(&model(name)).err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(failed.is_empty(), "refused:\n{}", failed.join("\n"));
}

/// `forward` calls a submodule's `forward`, which calls a function, which maps a file: the refusal
/// names the operator in each, the outer `forward` included (its calls are inlined).
#[test]
fn a_forward_that_maps_a_file_is_refused_naming_from_file() {
    let refusal = checker().check(&model("from-file.pt")).expect_err("refused");
    assert!(refusal.is_the_models_fault());
    let message = refusal.to_string();
    let functions = ["__torch__.FromFile.forward", "__torch__.Leaker.forward", "__torch__.leak"].map(str::to_owned).to_vec();
    assert_eq!(offences(refusal), [Offence { operator: "aten::from_file".to_owned(), functions }], "{message}");
    assert!(
        message.ends_with("aten::from_file (in __torch__.FromFile.forward, __torch__.Leaker.forward, __torch__.leak)"),
        "{message}"
    );
}

#[test]
fn an_operator_outside_the_allow_list_is_refused_by_name() {
    let refusal = checker().check(&model("odd-op.pt")).expect_err("refused");
    assert_eq!(
        offences(refusal),
        [Offence { operator: "prim::Print".to_owned(), functions: vec!["__torch__.OddOp.forward".to_owned()] }]
    );
}

/// `forward` sorts objects whose `__lt__` maps a file: no call node leads to `__lt__`, so it is
/// found only because every method of every class the code uses is checked.
#[test]
fn a_method_called_without_a_call_node_is_checked_too() {
    let offences = offences(checker().check(&model("sort-from-file.pt")).expect_err("refused"));
    assert_eq!(
        offences,
        [Offence { operator: "aten::from_file".to_owned(), functions: vec!["__torch__.Ranked.__lt__".to_owned()] }]
    );
}

#[test]
fn a_setstate_that_maps_a_file_is_refused_without_having_run() {
    let path = model("setstate-from-file.pt");

    // The checker, run where the file would appear: it names the operator, and nothing appears.
    let watched = fresh_dir("checker");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg(SUBCOMMAND)
        .current_dir(&watched)
        .stdin(std::fs::File::open(&path).expect("open the model"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run the checker");
    assert!(out.status.success(), "checker failed: {}", out.status);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON answer");
    let setstate = &answer["functions"]["__torch__.SetstateFromFile.__setstate__"];
    assert!(
        setstate.as_array().is_some_and(|ops| ops.iter().any(|op| op == "aten::from_file")),
        "__setstate__'s operators: {answer}"
    );
    assert_eq!(std::fs::read_dir(&watched).expect("read the folder").count(), 0, "the checker ran __setstate__");

    // The policy on top names __setstate__.
    let refusal = checker().check(&path).expect_err("refused");
    let offences = offences(refusal);
    let from_file = offences.iter().find(|o| o.operator == "aten::from_file").expect("aten::from_file refused");
    assert!(from_file.functions.contains(&"__torch__.SetstateFromFile.__setstate__".to_owned()), "{offences:?}");

    // And the model is what it says: loading it the ordinary way creates the file.
    let control = fresh_dir("control");
    let python = std::env::var_os("KILN_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"));
    let loaded = Command::new(&python)
        .args(["-c", "import sys, torch; torch.jit.load(sys.argv[1])"])
        .arg(&path)
        .current_dir(&control)
        .status()
        .expect("run python");
    assert!(loaded.success(), "torch.jit.load failed");
    assert!(control.join(SETSTATE_TARGET).exists(), "loading the model should have created {SETSTATE_TARGET}");
    let _ = std::fs::remove_dir_all(&watched);
    let _ = std::fs::remove_dir_all(&control);
}

#[test]
fn bytes_that_are_no_torchscript_are_refused_as_unreadable() {
    let dir = fresh_dir("garbage");
    let path = dir.join("garbage.pt");
    std::fs::write(&path, b"PK\x03\x04 this is no zip archive at all").expect("write");
    let refusal = checker().check(&path).expect_err("refused");
    assert!(matches!(refusal, GraphRefusal::Unreadable(_)), "{refusal}");
    assert!(refusal.is_the_models_fault());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Landlock and seccomp are in place, or the answer says why not; `KILN_EXPECT_CONFINEMENT=1` (or
/// a kernel that lists Landlock among its security modules) makes their absence a failure.
#[test]
fn the_checker_confines_itself_or_says_why_not() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg(SUBCOMMAND)
        .stdin(std::fs::File::open(model("offset-1.pt")).expect("open the model"))
        .output()
        .expect("run the checker");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON answer");
    let report = answer["confinement"]["report"].as_str().unwrap_or_default();
    let complete = answer["confinement"]["complete"] == true;
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    let expected = std::env::var_os("KILN_EXPECT_CONFINEMENT").is_some_and(|v| v == "1") || lsm.split(',').any(|m| m.trim() == "landlock");
    if complete {
        assert!(report.contains("landlock ABI") && report.contains("seccomp"), "{report}");
    } else {
        assert!(!expected, "the checker is not fully confined: {report}");
        assert!(report.contains("landlock") || report.contains("seccomp"), "no reason given: {report}");
        eprintln!("the checker is only partly confined here: {report}");
    }
}

#[test]
fn a_check_that_runs_out_of_time_is_killed_and_refuses_the_file() {
    let refusal = checker().timeout(std::time::Duration::from_millis(1)).check(&model("resnet18.pt")).expect_err("too slow");
    assert!(matches!(&refusal, GraphRefusal::CheckFailed(m) if m.contains("took more than")), "{refusal}");
    assert!(refusal.is_the_models_fault());
}
