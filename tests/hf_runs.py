"""Tiny Hugging Face `transformers` runs, trained a few steps and saved as `Trainer` saves them.

`train_run(root, config, save_steps)` trains `AutoModelForCausalLM.from_config(config)` with AdamW on random
token ids, logs `loss`, `learning_rate` and `epoch` every step and `eval_loss` every other step, and at each step
of `save_steps` writes `root/checkpoint-<step>/` with `save_pretrained` (sharded with `max_shard_size`) and a
`trainer_state.json` holding the log history so far, as `Trainer._save_checkpoint` does (with `pickled`, the
weights as the older `pytorch_model.bin` instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, PretrainedConfig

VOCAB = 64
SEQ = 12


def neox_config() -> GPTNeoXConfig:
    """A 2-layer GPT-NeoX (Pythia's architecture) with hidden size 16: untied output embedding."""
    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, rotary_pct=0.5,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)


def gpt2_config() -> GPT2Config:
    """A 2-layer GPT-2 with hidden size 16: `lm_head.weight` tied to `transformer.wte.weight`."""
    return GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                      eos_token_id=0)


def tokens(n: int, seed: int) -> torch.Tensor:
    """`(n, SEQ)` random token ids."""
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def train_run(root: Path, config: PretrainedConfig, save_steps: tuple[int, ...] = (2, 4, 6), *,
              max_shard_size: str | int | None = None, pickled: bool = False) -> Path:
    """Train and save a run under `root` (see the module docstring); returns `root`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (2 * max(save_steps)))
    train, held_out = tokens(8, 1), tokens(4, 2)
    history: list[dict] = []
    for step in range(1, max(save_steps) + 1):
        model.train()
        loss = model(input_ids=train, labels=train).loss
        loss.backward()
        history.append({"loss": loss.item(), "learning_rate": schedule.get_last_lr()[0], "epoch": step / 4,
                        "step": step})
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            model.eval()
            with torch.no_grad():
                history.append({"eval_loss": float(model(input_ids=held_out, labels=held_out).loss),
                                "epoch": step / 4, "step": step})
        if step in save_steps:
            folder = root / f"checkpoint-{step}"
            options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            model.save_pretrained(folder, **options)
            if pickled:  # the older format: the whole state dict (tied aliases included) in pytorch_model.bin
                (folder / "model.safetensors").unlink()
                torch.save(model.state_dict(), folder / "pytorch_model.bin")
            state = {"global_step": step, "epoch": step / 4, "max_steps": max(save_steps),
                     "log_history": list(history)}
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return root
