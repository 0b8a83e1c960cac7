"""``opd_kernels.integrations.trl`` (issue 12, item 3): TRL's own ``train()`` loop with the fused top-K loss.

Tiny random Llama student / teacher, a character-level tokenizer built in memory and an in-memory dataset of
prompts (nothing downloaded). Checks that the loss goes through ``opd_kernels`` (``teacher_topk`` +
``topk_rkl_loss`` counted, the student's LM head never called inside the loss: no ``[tokens, V]`` logits), that
training runs for a few optimizer steps, and that at K = V the first step's loss equals TRL's own ``beta=1``
(reverse KL) loss on the same batch. Skipped when trl is not installed (``pip install -e ".[trl]"``).
"""

import contextlib
import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
tf = pytest.importorskip("transformers")

from opd_kernels import api  # noqa: E402
from opd_kernels.integrations.trl import TopKDistillationConfig, TopKDistillationTrainer  # noqa: E402
from tests.utils import assert_close  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz "


def _tokenizer(chars=CHARS):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    out = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                     unk_token="<unk>", padding_side="left", truncation_side="left")
    return out


def _model(tok, hidden, layers, seed, kind="llama"):
    kw = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    config_cls, model_cls, extra = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(head_dim=8, final_logit_softcapping=2.0)),
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=0.5)),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw, **extra))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _dataset():
    from datasets import Dataset
    words = ["abc", "hello", "kite", "zebra", "moon", "tree", "quiz", "lamp"]
    return Dataset.from_dict({"prompt": [f"{w} " for w in words]})


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                max_steps=3, max_completion_length=6, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                report_to="none", bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
                seed=0, temperature=0.9, dataloader_num_workers=0)
    base.update(kw)
    return TopKDistillationConfig(**base)


@pytest.fixture
def counted(monkeypatch):
    """Counts of the library calls made from the trainer's loss."""
    calls = {"teacher_topk": 0, "topk_rkl_loss": 0}
    for name in calls:
        orig = getattr(api, name)

        def wrapper(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(api, name, wrapper)
    return calls


def _trainer(tmp_path, tok, student_kind="llama", teacher_kind="llama", **kw):
    os.environ.setdefault("WANDB_DISABLED", "true")
    student, teacher = _model(tok, 32, 2, 1, student_kind), _model(tok, 48, 2, 2, teacher_kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TopKDistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, **kw),
                                       train_dataset=_dataset(), processing_class=tok)


def test_trl_train_runs_through_the_fused_loss(tmp_path, counted):
    tok = _tokenizer()
    trainer = _trainer(tmp_path, tok, teacher_k=8, loss_variant="tail", loss_ignore_ids=[tok.pad_token_id])
    student = trainer.model
    head_calls = {"in_loss": 0}
    in_loss = {"on": False}
    student.lm_head.register_forward_hook(lambda *a: head_calls.__setitem__("in_loss", head_calls["in_loss"]
                                                                             + in_loss["on"]))
    original = trainer._compute_loss
    losses = []

    def compute(*a, **k):
        in_loss["on"] = True
        try:
            out = original(*a, **k)
        finally:
            in_loss["on"] = False
        losses.append(float(out[0].detach()))
        return out
    trainer._compute_loss = compute
    before = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = trainer.train()
    assert result.global_step == 3
    assert counted["teacher_topk"] == counted["topk_rkl_loss"] == len(losses) == 3
    assert head_calls["in_loss"] == 0, "the student's LM head ran inside the loss ([tokens, V] logits)"
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, student.model.layers[0].self_attn.q_proj.weight)       # it trained
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("entropy" in h for h in logged)


@pytest.mark.parametrize("student_kind,teacher_kind", [("llama", "llama"), ("cohere", "gemma2")])
def test_first_step_loss_equals_trls_reverse_kl_at_k_equal_v(tmp_path, counted, student_kind, teacher_kind):
    """teacher_k = V: the top-K reverse KL is the full reverse KL, TRL's loss at beta = 1 (same batch, same
    temperature, before any optimizer step); also with a logit-scaled student (Cohere) and a soft-capped
    teacher (Gemma-2), which TRL reads from their configs and opd_kernels from lm_head_spec."""
    tok = _tokenizer()
    trainer = _trainer(tmp_path, tok, student_kind, teacher_kind, teacher_k=len(tok), loss_variant="stopgrad",
                       beta=1.0, max_steps=1)
    original = trainer._compute_loss
    pairs = []

    def compute(student, inputs, num_items):
        ours = original(student, inputs, num_items)
        with torch.no_grad():
            theirs = trl.DistillationTrainer._compute_loss(trainer, student, inputs, num_items)
        pairs.append((ours, theirs))
        return ours
    trainer._compute_loss = compute
    trainer.train()
    (ours, theirs), = pairs
    assert counted["topk_rkl_loss"] == 1
    assert_close("first-step loss", ours[0].detach(), theirs[0], 1e-5)
    assert int(ours[2]) == int(theirs[2]) > 0                                # the same completion tokens
    assert_close("entropy sum", ours[1], theirs[1], 1e-4)


def test_keywords_override_the_config(tmp_path):
    tok = _tokenizer()
    with contextlib.ExitStack():
        trainer = _trainer(tmp_path, tok, teacher_k=5)
    assert (trainer.teacher_k, trainer.loss_variant, trainer.loss_backend) == (5, "stopgrad", "auto")
    plain = trl.DistillationConfig(output_dir=str(tmp_path / "p"), bf16=False, use_cpu=True, report_to="none",
                                   gradient_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2 = TopKDistillationTrainer(model=_model(tok, 32, 1, 3), teacher_model=_model(tok, 32, 1, 4), args=plain,
                                     train_dataset=_dataset(), processing_class=tok, teacher_k=7, loss_variant="tail")
    assert (t2.teacher_k, t2.loss_variant) == (7, "tail")
