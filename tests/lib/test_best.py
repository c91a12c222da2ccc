"""best.json and best.csv are the typed records of `saev.best`, field for field: a field added to a record shows up in
both files, in the notebook API and in the report's class records, or a test here fails."""

import ast
import csv
import inspect
import json

import pytest

from saev import best, report, results


@pytest.fixture(scope="module")
def reduce_dpath(done_config):
    (fpath,) = (done_config.parent / "runs").glob("reduce/*/best.json")
    return fpath.parent


def test_best_json_keys_are_the_record_fields(reduce_dpath):
    obj = json.loads((reduce_dpath / "best.json").read_text())
    assert list(obj) == best.fields(best.Best)
    assert obj["classes"] and all(list(row) == best.fields(best.ClassBest) for row in obj["classes"])
    assert obj["per_sae"]
    for entry in obj["per_sae"].values():
        assert list(entry) == best.fields(best.SaeBest)
        assert all(list(row) == best.fields(best.SaeClassBest) for row in entry["classes"])


def test_best_csv_columns_are_the_class_record_fields(reduce_dpath):
    with open(reduce_dpath / "best.csv", newline="") as fd:
        reader = csv.DictReader(fd)
        rows = list(reader)
    assert reader.fieldnames == best.csv_columns()
    assert sorted(reader.fieldnames) == sorted(best.fields(best.ClassBest))
    record = best.read(reduce_dpath / "best.json")
    assert [row["name"] for row in rows] == [c.name for c in record.classes]


def test_reading_and_writing_best_json_back_gives_the_same_bytes(reduce_dpath, tmp_path):
    record = best.read(reduce_dpath / "best.json")
    best.write(tmp_path, record)
    assert (tmp_path / "best.json").read_bytes() == (reduce_dpath / "best.json").read_bytes()
    assert (tmp_path / "best.csv").read_bytes() == (reduce_dpath / "best.csv").read_bytes()


def test_the_notebook_and_report_records_extend_the_class_record():
    fields = best.fields(best.ClassBest)
    assert best.fields(results.ClassResult)[: len(fields)] == fields
    assert best.fields(report.ClassResult)[: len(fields)] == fields
    assert issubclass(results.ClassResult, best.ClassBest) and issubclass(report.ClassResult, best.ClassBest)


def test_every_record_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(best))
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    doc = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring"
                    )


@pytest.mark.parametrize("change", ["missing", "extra", "type"])
def test_a_best_json_that_is_not_the_record_is_refused_naming_the_file(reduce_dpath, tmp_path, change):
    obj = json.loads((reduce_dpath / "best.json").read_text())
    row = obj["classes"][0]
    if change == "missing":
        del row["heldout_ap"]
    elif change == "extra":
        row["colour"] = "red"
    else:
        row["prototype"] = "five"
    fpath = tmp_path / "best.json"
    fpath.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=f"{fpath} is not a best.json of this version"):
        best.read(fpath)
