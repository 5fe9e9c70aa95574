"""Distillation and fine-tuning (paper §4): the loss against a from-scratch version, the dense student's copied
weights, clear errors for a bad teacher, exact resume with a teacher, and the sweep's teacher-first stages."""
import csv

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from switch_core import distill, experiments, sweep
from switch_core.model import ModelConfig, SwitchLM
from switch_core.train import compute_loss, main, make_config, train

TINY = dict(n_layer=2, n_head=2, d_model=16, d_ff=32, seq_len=16, batch_size=4, n_experts=4, switch_every=1,
            steps=6, warmup_steps=1, eval_interval=3, eval_batches=1, checkpoint_interval=3, sample_chars=0,
            device="cpu")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, shakespeare_root, single_thread):
    """A tiny trained Switch run directory (the teacher)."""
    out = tmp_path_factory.mktemp("teacher") / "switch"
    train(make_config(None, **TINY, data_root=str(shakespeare_root)), out, progress=False)
    return out


def _metrics(path):
    with open(path / "metrics.csv", newline="") as f:  # tokens_per_s is a timing, not a result
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader(f)]


def test_distillation_loss_equals_three_lines():
    torch.manual_seed(0)
    s, t, y = torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    for w, tau in ((0.25, 1.0), (1.0, 2.0), (0.5, 0.5)):
        hard = F.cross_entropy(s.flatten(0, 1), y.flatten())
        soft = -(F.softmax(t / tau, -1) * F.log_softmax(s / tau, -1)).sum(-1).mean() * tau ** 2
        loss, h, so = distill.distillation_loss(s, t, y, w, tau)
        assert_close(loss, (1 - w) * hard + w * soft)
        assert_close(h, hard) and assert_close(so, soft)


def test_distillation_loss_of_a_student_equal_to_its_teacher_is_the_teacher_entropy():
    t = torch.randn(1, 4, 6)
    p = F.softmax(t, -1)
    entropy = -(p * p.log()).sum(-1).mean()  # CE(p, p) = H(p): the soft term's floor
    assert_close(distill.distillation_loss(t, t, torch.zeros(1, 4, dtype=torch.long), 1.0)[0], entropy)


def test_weight_zero_is_plain_cross_entropy():
    s, y = torch.randn(1, 3, 5), torch.tensor([[0, 4, 2]])
    loss, hard, soft = distill.distillation_loss(s, torch.randn(1, 3, 5), y, 0.0)
    assert_close(loss, F.cross_entropy(s[0], y[0])) and soft.item() == 0.0


def test_dense_student_copies_every_non_expert_parameter():
    torch.manual_seed(0)
    teacher = SwitchLM(ModelConfig(n_layer=2, n_head=2, d_model=8, d_ff=16, n_experts=4, switch_every=2))
    t = dict(teacher.named_parameters())
    for init_ffn in distill.INIT_FFN:
        student = distill.dense_student(teacher, init_ffn)
        assert student.cfg.switch_every == 0 and student.cfg.d_ff == teacher.cfg.d_ff  # FLOP-matched
        for name, p in student.named_parameters():
            if ".ffn." not in name or name.startswith("blocks.0."):  # block 0's FFN is dense in both
                assert_close(p, t[name], msg=name)
        w_in = student.blocks[1].ffn.w_in.weight  # [F, D]; the teacher's experts.w_in is [E, D, F]
        stack = t["blocks.1.ffn.experts.w_in"]
        if init_ffn == "expert0":
            assert_close(w_in, stack[0].T)
        elif init_ffn == "mean":
            assert_close(w_in, stack.mean(0).T)
        else:
            assert not torch.equal(w_in, stack[0].T)


def test_student_of_another_size_is_refused():
    teacher = SwitchLM(ModelConfig(n_layer=1, n_head=2, d_model=8, d_ff=16, n_experts=4, switch_every=1))
    wider = SwitchLM(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=16, switch_every=0))
    with pytest.raises(ValueError, match="tok_emb.weight"):
        distill.copy_weights(wider, teacher)
    more_experts = SwitchLM(ModelConfig(n_layer=1, n_head=2, d_model=8, d_ff=16, n_experts=8, switch_every=1))
    with pytest.raises(ValueError, match="Switch FFNs differ"):
        distill.copy_weights(more_experts, teacher)
    with pytest.raises(ValueError, match="init_ffn"):
        distill.copy_weights(wider, teacher, "median")


@pytest.mark.parametrize("field, value", [("distill_weight", 1.5), ("distill_temperature", 0.0),
                                          ("init_ffn", "median"), ("distill_from", "")])
def test_bad_distillation_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        make_config(None, **{field: value})


def test_bad_teacher_is_one_line_error_exit_2(teacher_run, tmp_path, capsys, shakespeare_root):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")
    common = ["--preset", "tiny", "--data-root", str(shakespeare_root), "--no-progress"]
    cases = {"no run directory": ["--distill-from", str(tmp_path / "missing")],
             "not a readable checkpoint": ["--distill-from", str(corrupt)],
             "cannot teach": ["--distill-from", str(teacher_run), "--seq-len", "32"],
             "same sizes outside their FFNs": ["--init-from", str(teacher_run), "--d-model", "32"]}
    for message, flags in cases.items():
        assert main(common + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_teacher_is_frozen_in_eval_mode_and_changes_the_loss(teacher_run):
    cfg = ModelConfig(**{k: TINY[k] for k in ("n_layer", "n_head", "d_model", "d_ff", "seq_len")},
                      switch_every=0)
    teacher = distill.load_teacher(teacher_run, cfg)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student, x = SwitchLM(cfg), torch.randint(0, 65, (2, 16))
    tcfg = make_config(None, distill_weight=1.0)
    loss, ce, _ = compute_loss(student, x, x, tcfg, teacher=teacher)
    plain, ce_plain, _ = compute_loss(student, x, x, tcfg)
    assert_close(ce, ce_plain) and not torch.equal(loss, plain)  # train_loss stays the hard CE
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_distilled_run_resumes_exactly(teacher_run, tmp_path, shakespeare_root):
    cfg = make_config(None, **{**TINY, "switch_every": 0}, data_root=str(shakespeare_root),
                      distill_from=str(teacher_run), init_from=str(teacher_run), init_ffn="mean")
    whole = train(cfg, tmp_path / "whole", progress=False)
    train(cfg, tmp_path / "split", stop_at=3, progress=False)
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False)
    assert _metrics(tmp_path / "whole") == _metrics(tmp_path / "split")
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_init_from_a_run_starts_at_its_loss_with_a_fresh_optimizer(teacher_run, tmp_path, shakespeare_root):
    """Fine-tuning (§4.1): the same model with dropout 0.1 / expert dropout 0.4 starts at the run's val loss."""
    cfg = make_config(None, **{**TINY, "steps": 3, "warmup_steps": 2}, data_root=str(shakespeare_root),
                      init_from=str(teacher_run), dropout=0.1, expert_dropout=0.4)
    result = train(cfg, tmp_path / "ft", progress=False)
    teacher_val = [r["val_loss"] for r in _metrics(teacher_run) if r["val_loss"]][-1]
    assert result.metrics[0]["val_loss"] == pytest.approx(float(teacher_val), abs=1e-6)  # eval: no dropout
    assert result.metrics[1]["lr"] == pytest.approx(cfg.lr / cfg.warmup_steps)  # a fresh warmup


def test_sweep_runs_the_teacher_first(monkeypatch, tmp_path, shakespeare_root):
    base = {**TINY, "data_root": str(shakespeare_root), "steps": 2, "eval_interval": 2}
    run_of = experiments.run_of
    exp = experiments.Experiment("kd", "a test", cpu=base, cuda=base, seeds=(1, 2), variants={
        "student": dict(switch_every=0, distill_from=run_of("teacher"), init_from=run_of("teacher")),
        "teacher": dict()})
    monkeypatch.setitem(experiments.EXPERIMENTS, "kd", exp)
    runs = sweep.plan(exp, "cpu", tmp_path / "runs")
    assert runs[0].cfg.distill_from == str(tmp_path / "runs" / "teacher-s1") and runs[0].needs == ("teacher",)
    assert [[r.name for r in s] for s in sweep.stages(runs)] == [["teacher-s1", "teacher-s2"],
                                                                ["student-s1", "student-s2"]]
    assert [[r.name for r in s] for s in sweep.stages(runs[:1], finished=runs[1:2])] == [["student-s1"]]
    out = sweep.run_sweep("kd", runs_root=tmp_path / "runs", results_root=tmp_path / "data", progress=False)
    assert (out / "results.csv").is_file()
    bad = experiments.Experiment("bad", "", cpu=base, cuda=base, variants={"a": dict(init_from=run_of("b"))})
    with pytest.raises(ValueError, match="needs the run of 'b'"):
        sweep.plan(bad, "cpu", tmp_path / "runs")


def test_data_slice_keeps_one_speaker_or_all_others():
    from switch_core import finetune

    text = "A:\nhi\n\nB:\nhello there\n\nA:\nyo\n\nno speaker line"
    assert finetune.speakers_by_size(text) == ["B", "A"]  # B: 14 characters, A: 2 x 5
    assert finetune.slice_text(text, "speaker:#1") == ("B:\nhello there", "B")
    assert finetune.slice_text(text, "without:B")[0] == "A:\nhi\n\nA:\nyo\n\nno speaker line"
    assert finetune.slice_text(text, "speaker:A")[0] == "A:\nhi\n\nA:\nyo"
    for bad in ("speaker", "everyone:A", "speaker:#0", "speaker:"):
        with pytest.raises(ValueError, match="data_slice"):
            make_config(None, data_slice=bad)
    with pytest.raises(ValueError, match="no speeches by 'C'"):
        finetune.slice_text(text, "speaker:C")


def test_a_slice_shares_the_whole_texts_tokenizer(shakespeare_root):
    from switch_core import finetune
    from switch_core.data import load_char_data

    whole = load_char_data(shakespeare_root, download=False)
    one = finetune.load_slice_data(shakespeare_root, "speaker:#1")
    assert one.tokenizer.chars == whole.tokenizer.chars
    assert whole.tokenizer.decode(one.train[:11]) == "GLOUCESTER:"
