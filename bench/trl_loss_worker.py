"""TRL's side of bench/trl_loss_equality.py: run under a Python that has `trl` installed.

    python bench/trl_loss_worker.py IN.pt OUT.pt

IN.pt (written by trl_loss_equality.py): the model directory (a saved Qwen2 and its tokenizer), the
input tensors and a list of cases, each with the GRPOConfig fields TRL is to use. For every case this
builds a GRPOTrainer, calls its loss, `trainer._compute_loss(model, inputs)`, on the inputs dict that
TRL's own `_generate_and_score_completions` hands it, backpropagates, and keeps the loss, the gradient
of every parameter and TRL's token log-probs. OUT.pt: those results, TRL's version and the GRPOConfig /
RLOOConfig defaults the README's name map quotes."""
import sys
import tempfile

import torch
import transformers
import trl
from datasets import Dataset
from transformers import PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer, RLOOConfig

torch.set_num_threads(2)


def dummy_reward(completions, **kwargs):  # the trainer needs one; _compute_loss never calls it
    return [0.0] * len(completions)


def trl_inputs(d, case):
    """The dict _compute_loss reads (GRPOTrainer._generate_and_score_completions builds the same keys).
    num_items_in_batch: the loss tokens of the whole generation batch (dapo / cispo divide by it)."""
    P = d["prompt_len"]
    ids, attn, cmask = d["input_ids"], d["attention_mask"], d["completion_mask"]
    inputs = {"prompt_ids": ids[:, :P], "prompt_mask": attn[:, :P],
              "completion_ids": ids[:, P:], "completion_mask": cmask.int(),   # TRL's masks are int
              "advantages": d["advantages"], "num_items_in_batch": cmask.sum()}
    if case["iterations"] > 1:  # absent: TRL uses per_token_logps.detach(), ratio 1
        inputs["old_per_token_logps"] = d["old_logp"]
    if case["trl"]["beta"] != 0.0:
        inputs["ref_per_token_logps"] = d["ref_logp"]
    return inputs


def run_case(d, case, tok, dataset):
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to="none",
                      per_device_train_batch_size=d["input_ids"].shape[0], num_generations=d["group_size"],
                      gradient_accumulation_steps=1, max_completion_length=d["completion_mask"].shape[1],
                      temperature=1.0, num_iterations=case["iterations"], save_strategy="no", seed=0,
                      model_init_kwargs={"dtype": "float32", "attn_implementation": d["attn_implementation"]},
                      **case["trl"])
    trainer = GRPOTrainer(model=d["model_dir"], processing_class=tok, reward_funcs=[dummy_reward], args=args,
                          train_dataset=dataset)
    model = trainer.model
    model.train()                               # _compute_loss picks its normaliser by model.training
    model.zero_grad(set_to_none=True)
    # Trainer.train() sets this per optimizer step (the micro-batches in it); one micro-batch here
    trainer.current_gradient_accumulation_steps = 1
    inputs = trl_inputs(d, case)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logp = trainer._get_per_token_logps_and_entropies(model, ids, attn, ids.shape[1] - d["prompt_len"])[0]
    return {"loss": float(loss.detach()), "grads": grads, "logp": logp.detach().clone(),
            "gradient_checkpointing": bool(args.gradient_checkpointing)}


def defaults():
    """The TRL defaults the README's name map relies on, read from the installed classes."""
    g = GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none")
    r = RLOOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none")
    keys = ("loss_type", "scale_rewards", "beta", "use_bias_correction_kl", "epsilon", "epsilon_high",
            "importance_sampling_level", "num_iterations", "mask_truncated_completions", "sapo_temperature_pos",
            "sapo_temperature_neg", "temperature", "gradient_checkpointing")
    out = {f"GRPOConfig.{k}": getattr(g, k) for k in keys}
    out.update({f"RLOOConfig.{k}": getattr(r, k) for k in ("normalize_advantages", "beta", "epsilon", "epsilon_high")})
    return out


if __name__ == "__main__":
    d = torch.load(sys.argv[1], weights_only=False)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok = PreTrainedTokenizerFast.from_pretrained(d["model_dir"])
    dataset = Dataset.from_list([{"prompt": "t1 t2 t3"}] * d["input_ids"].shape[0])
    results = {}
    for case in d["cases"]:
        results[case["name"]] = run_case(d, case, tok, dataset)
        print(f"trl: {case['name']} loss {results[case['name']]['loss']:.6g}", file=sys.stderr, flush=True)
    torch.save({"trl_version": trl.__version__, "transformers_version": transformers.__version__,
                "torch_version": torch.__version__, "defaults": defaults(), "results": results}, sys.argv[2])
