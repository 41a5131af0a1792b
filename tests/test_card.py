"""The sparsity card writer: plain records in, the same card beside any artifact."""

from __future__ import annotations

import json

import pytest

from ticketc.card import Card, LayerRecord, card_paths, card_stem, render_markdown, write_card


def _records() -> list[LayerRecord]:
    return [
        LayerRecord(
            name="fc1.weight",
            shape=(300, 784),
            dtype="float32",
            nnz=8467,
            pattern="unstructured",
            layout="portable rice",
            values="int8",
            dense_bytes=940800,
            stored_bytes=14000,
            bound_bytes=13500.5,
            max_abs_error=0.004,
            max_rel_error=0.003,
            speedup=2.5,
            speedup_basis="measured, CPU fp32 batch 64",
        ),
        LayerRecord(
            name="fc1.bias",
            shape=(300,),
            dtype="float32",
            nnz=300,
            pattern="dense",
            layout="dense",
            values="float32 (lossless)",
            dense_bytes=1200,
            stored_bytes=1200,
            bound_bytes=1200,
            speedup_note="dense: nothing to skip",
        ),
    ]


def test_card_beside_an_onnx_file(tmp_path):
    artifact = tmp_path / "lenet.onnx"
    artifact.write_bytes(b"x" * 16000)
    card = Card(
        artifact=str(artifact),
        kind="portable ONNX (int8 values)",
        source="ticket.pt",
        layers=_records(),
        files={"lenet.onnx": 16000},
        reference=("dense ONNX export", 1_066_000),
        runtimes={"onnxruntime": "size only", "ticketc runtime": "2.5x measured"},
        notes=["a note"],
    )
    md, js = write_card(card, card_stem(artifact))
    assert (md.name, js.name) == ("lenet.card.md", "lenet.card.json")
    data = json.loads(js.read_text())
    assert data["totals"]["file_bytes"] == 16000
    assert data["totals"]["times_smaller"] == pytest.approx(1_066_000 / 16000)
    assert data["totals"]["bound_bytes"] == pytest.approx(14700.5)
    assert data["totals"]["density"] == pytest.approx((8467 + 300) / (300 * 784 + 300))
    assert data["layers"][0]["density"] == pytest.approx(8467 / (300 * 784))
    text = md.read_text()
    for expected in ("fc1.weight", "2.50x, measured", "nothing to skip", "onnxruntime", "a note"):
        assert expected in text


def test_card_of_a_directory_lives_inside_it(tmp_path):
    assert card_paths(card_stem(tmp_path)) == (
        tmp_path / "sparsity.card.md",
        tmp_path / "sparsity.card.json",
    )


def test_a_file_larger_than_its_reference_is_said_to_be_larger():
    """An EmbeddingBag's Loop body outweighs its pruned weights: the card said "0.24x
    smaller than the graph's weights"; it says 4.20x their size."""
    reference = ("graph's weights as dense fp32", 1000)
    card = Card("x", "k", "s", layers=[], files={"x.onnx": 4200}, reference=reference)
    text = render_markdown(card)
    assert "4.20x the size of the graph's weights" in text and "smaller" not in text


def test_empty_card_renders_without_dividing_by_zero():
    card = Card(artifact="x", kind="k", source="s", layers=[], files={})
    assert "Sparsity card" in render_markdown(card)
    assert card.totals["file_bytes_over_bound"] is None
    json.dumps(card.to_json(), allow_nan=False)


@pytest.mark.parametrize("values", [pytest.param("fp32", marks=pytest.mark.slow), "int8"])
def test_export_writes_a_card_beside_the_onnx_file(tmp_path, capsys, values):
    from pathlib import Path

    import torch

    from ticketc.cli import main
    from ticketc.load import load_model

    ticket = Path(__file__).resolve().parents[1] / "examples" / "lenet300-ticket.pt"
    out = tmp_path / "lenet.onnx"
    assert main(["export", str(ticket), "-o", str(out), "--values", values, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    md, js = card_paths(card_stem(out))
    card = json.loads(js.read_text())
    assert md.read_text().startswith("# Sparsity card: lenet.onnx")
    assert card["files"] == {"lenet.onnx": out.stat().st_size}
    names = [", ".join(r["sources"]) or r["initializer"] for r in result["layers"]]
    assert [r["name"] for r in card["layers"]] == names
    weights = dict(load_model(ticket).model.named_parameters())
    pruned = [r for r in card["layers"] if r["name"].endswith("weight")]
    assert len(pruned) == 3
    for record in pruned:
        w = weights[record["name"]].detach()
        assert record["nnz"] == int(w.count_nonzero()) and record["pattern"] == "unstructured"
        assert record["values"] == values and record["stored_bytes"] < record["dense_bytes"]
        if values == "fp32":
            assert record["max_abs_error"] == 0.0
        else:  # int8: at most half a quantisation step of the largest weight
            assert 0 < record["max_abs_error"] <= float(w.abs().max()) / 127 * 0.5 + 1e-7
    assert "size only" in card["runtimes"]["onnxruntime"]
    assert card["totals"]["times_smaller"] == pytest.approx(
        result["weight_bytes"] / result["total_bytes"]
    )
    assert torch.isfinite(torch.tensor(card["totals"]["bound_bytes"]))
