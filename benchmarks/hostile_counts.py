"""Counts of the hostile-input suite by class: tried, handled with a clear error, data lost, hangs, silently wrong.

    python benchmarks/hostile_counts.py                      # runs tests/hostile/ (slow ones included)
    python benchmarks/hostile_counts.py --junit a.xml b.xml  # counts existing pytest --junitxml reports

Every test case (each parametrization and each hypothesis fuzz test counts once) belongs to the class of
failure it guards against (issue classes: data lost, hang, silently wrong, unclear message). A case that
passes was handled: its assertions check the exit code, one `error:` line naming the culprit, no
traceback and no file changed (or, for a case that must succeed, the correct result). A case that fails
or errors is counted in its class; a hang is a failure too (the suite's alarm stops it at 60 s).
Writes benchmarks/results/hostile_counts.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# test function -> the class of failure it guards against, and whether a pass is a refusal (clear error)
# or a correct completion
CLASSES: dict[str, tuple[str, str]] = {
    # data lost
    "test_folder_with_user_files_is_refused": ("data lost", "error"),
    "test_current_folder_is_refused": ("data lost", "error"),
    "test_existing_file_is_refused": ("data lost", "error"),
    "test_existing_file_is_refused_as_gguf_target": ("data lost", "error"),
    "test_special_files_are_never_followed_or_moved": ("data lost", "error"),
    "test_empty_out_and_unwritable_parent_are_refused_before_work": ("data lost", "error"),
    "test_force_keeps_user_files_and_replaces_only_advisors": ("data lost", "completes"),
    "test_rewrite_of_advisor_folder_and_leftovers_are_cleaned": ("data lost", "completes"),
    "test_failed_write_leaves_nothing_and_keeps_the_previous_output": ("data lost", "error"),
    "test_recommend_out_refuses_a_users_folder_unless_forced": ("data lost", "error"),
    "test_recommend_force_never_replaces_a_users_file_of_a_name_it_writes": ("data lost", "error"),
    "test_recommend_out_current_folder_and_file_are_refused": ("data lost", "error"),
    # hangs / unbounded memory
    "test_gguf_array_claiming_2_to_the_40_items_is_refused_at_once": ("hang", "error"),
    "test_gguf_counts_beyond_the_file_are_refused": ("hang", "error"),
    "test_gguf_parser_counts_a_real_file": ("hang", "completes"),
    "test_config_claiming_100000_layers_beside_2_layer_weights_is_refused": ("hang", "error"),
    "test_implausible_layer_counts_are_refused": ("hang", "error"),
    "test_safetensors_fifo_does_not_hang": ("hang", "error"),
    "test_fifo_anywhere_in_the_model_folder_is_refused": ("hang", "error"),
    "test_fuzz_safetensors_header": ("hang", "completes"),
    "test_fuzz_safetensors_bytes": ("hang", "completes"),
    "test_fuzz_gguf_metadata": ("hang", "completes"),
    "test_fuzz_gguf_bytes": ("hang", "completes"),
    # silently wrong
    "test_checkpoint_tensors_must_match_the_architecture": ("silently wrong", "error"),
    "test_native_folder_changed_after_saving_is_refused": ("silently wrong", "error"),
    "test_native_weights_missing_a_tensor_are_refused": ("silently wrong", "error"),
    "test_a_damaged_predictor_file_is_refused_before_the_model_loads": ("silently wrong", "error"),
    "test_nan_literals_and_bad_bytes_are_refused_naming_the_file": ("silently wrong", "error"),
    "test_the_shipped_file_and_a_saved_refit_are_valid": ("silently wrong", "completes"),
    "test_spec_strings_parse_or_raise_value_error": ("silently wrong", "completes"),
    "test_a_predictor_record_with_any_field_replaced_loads_valid_or_is_refused": ("silently wrong", "completes"),
    "test_a_predictor_record_missing_a_field_loads_or_is_refused": ("silently wrong", "completes"),
    "test_a_damaged_runs_file_is_read_valid_or_refused_naming_it": ("silently wrong", "completes"),
    "test_bad_option_values_are_refused_before_any_work": ("silently wrong", "error"),
    "test_workers_of_a_killed_sweep_stop_and_print_no_traceback": ("silently wrong", "completes"),
    "test_a_foreign_sqlite_store_is_refused_untouched": ("silently wrong", "error"),
    "test_advisor_stores_and_new_files_still_open": ("silently wrong", "completes"),
    "test_runs_of_one_family_or_one_model_are_refused_and_nothing_is_saved": ("silently wrong", "error"),
    # unclear messages
    "test_odd_safetensors_headers_give_a_clear_error": ("unclear", "error"),
    "test_truncated_safetensors": ("unclear", "error"),
    "test_absurd_group_size_is_refused_before_the_model_loads": ("unclear", "error"),
    "test_group_size_bound_in_the_spec_api": ("unclear", "error"),
    "test_infinite_memory_budget_is_refused": ("unclear", "error"),
    "test_device_cuda_on_a_cpu_build": ("unclear", "error"),
    "test_a_corpus_file_that_is_not_utf8_is_named": ("unclear", "error"),
    "test_a_config_json_that_is_not_utf8_is_named": ("unclear", "error"),
    "test_a_tokenizer_file_that_is_not_utf8_is_named": ("unclear", "error"),
    "test_a_bad_advisor_home_is_named": ("unclear", "error"),
    "test_a_model_folder_without_a_tokenizer": ("unclear", "error"),
}
TARGETS = ["tests/hostile/",
           "tests/test_fit_cli.py::test_runs_of_one_family_or_one_model_are_refused_and_nothing_is_saved"]


def _cases(paths: list[Path]) -> dict[str, str]:
    """test id -> passed | failed | skipped; a later report replaces an earlier one's result for a case."""
    out: dict[str, str] = {}
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            tid = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                out[tid] = "failed"
            elif case.find("skipped") is not None:
                out[tid] = "skipped"
            else:
                out[tid] = "passed"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--junit", nargs="*", default=None, help="existing pytest --junitxml reports to count")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hostile_counts.json"))
    args = p.parse_args(argv)
    reports = [Path(x) for x in args.junit] if args.junit else None
    if reports is None:
        report = Path(tempfile.mkdtemp(prefix="hostile-")) / "junit.xml"
        pytest = str(Path(sys.executable).with_name("pytest"))
        subprocess.run([pytest, *TARGETS, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"], cwd=ROOT)
        reports = [report]
    cases = _cases(reports)
    unknown = sorted({t.split("::")[-1].split("[")[0] for t in cases} - set(CLASSES))
    if unknown:
        print(f"error: no class for {', '.join(unknown)}; add them to CLASSES", file=sys.stderr)
        return 2
    counts = {"tried": 0, "skipped": 0, "handled": 0, "clear error": 0, "correct completion": 0,
              "data lost": 0, "hangs": 0, "silently wrong": 0, "unclear": 0}
    by_class: dict[str, dict[str, int]] = {}
    failed = []
    for tid, result in sorted(cases.items()):
        cls, kind = CLASSES[tid.split("::")[-1].split("[")[0]]
        row = by_class.setdefault(cls, {"tried": 0, "handled": 0, "failed": 0, "skipped": 0})
        if result == "skipped":
            counts["skipped"] += 1
            row["skipped"] += 1
            continue
        counts["tried"] += 1
        row["tried"] += 1
        if result == "passed":
            counts["handled"] += 1
            counts["clear error" if kind == "error" else "correct completion"] += 1
            row["handled"] += 1
        else:
            counts[{"hang": "hangs"}.get(cls, cls)] += 1
            row["failed"] += 1
            failed.append(tid)
    from advisor.kernels.io import atomic_write_text

    atomic_write_text(args.out, json.dumps({"counts": counts, "by_class": by_class, "failed": failed,
                                            "command": "python benchmarks/hostile_counts.py"}, indent=1))
    for k, v in counts.items():
        print(f"{k:20s} {v}")
    for t in failed:
        print(f"failed: {t}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
