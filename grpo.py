"""Reinforcement learning with verifiable rewards: `python grpo.py --config CFG [key=value ...] [--resume [PATH]]`.

Group relative policy optimisation (Shao et al., 2024) from an SFT checkpoint (`grpo.model_name_or_path`), which is
also the frozen reference. The data are prompts whose answers a program checks (smollm2/verifiers.py). As each batch
of completions is due, every prompt of a micro-batch gets G = `grpo.num_generations` completions sampled from the
policy with the one generation path (smollm2/sampling.py: KV cache, temperature, top-p); the verifiers score them;
each completion's advantage is its reward against its group's (smollm2/grpo_loss.py); the loss is the clipped
policy gradient with beta times the KL to the reference. The same completions serve `grpo.num_iterations` (mu)
optimizer steps, their importance ratios clipped to 1 +- epsilon. Logged per step: the reward and its spread in a
group, the share of groups whose rewards are all equal (no signal), KL, clip fraction, completion length and entropy;
at validation the greedy replies' reward and accuracy on held-out prompts, per task. Everything else is sft.py's and
train.py's: the loop, accumulation, checkpoints, exact resume (the completions of a batch and the seed of each draw
come from the data position; a checkpoint inside a batch's mu steps holds its completions), S3, DDP and FSDP.

    python grpo.py --config configs/config_grpo_tiny.yaml
    python grpo.py --config configs/config_grpo_tiny.yaml --score runs/tiny-sft runs/tiny-grpo   # held-out accuracy

Read next: evaluation.py, which scores any checkpoint on benchmarks.
"""

import copy
import dataclasses
import sys
from typing import Optional

import numpy as np
import torch

from model import SmolLM2
from sft import SFT, Rows, per_task, posttraining_command, start_from
from smollm2 import chat, chat_data, distributed, verifiers
from smollm2.config import Config, GRPOArgs
from smollm2.errors import CheckpointError, DataError
from smollm2.grpo_loss import group_advantages, policy_loss, token_logprobs
from smollm2.runtime import gather
from smollm2.sampling import SamplingParams, generate
from smollm2.task import to_device
from smollm2.tokenizer import eos_token_id

# ---------------------------------------------------------------- prompts and their answers


def as_prompt(example: dict, where: str) -> tuple[list[dict], str, str]:
    """An example -> (prompt messages, answer, task). Accepted: {"prompt": text or messages, "answer"} (TRL's prompt
    column), {"question", "answer"} (GSM8K's), or {"messages": [..., the assistant's answer]} (SFT's conversations,
    which the built-in tasks are); "task" names the example's task, for accuracy per task."""
    if "messages" in example:
        messages = chat.check_messages(example["messages"], f"{where}.messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise chat.ChatError(f"{where}.messages: the last message must be the assistant's answer, after a prompt")
        return messages[:-1], messages[-1]["content"], str(example.get("task", "all"))
    prompt = example.get("prompt", example.get("question"))
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    chat.check_messages(prompt, f"{where}.prompt")
    answer = example.get("answer")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise DataError(f"{where}: expected an 'answer' (text or number) beside the prompt, got {answer!r:.60}")
    return prompt, str(answer), str(example.get("task", "all"))


@dataclasses.dataclass
class Prompts:
    """Prompts as token ids, with their answers, tasks and examples (what a reward function is given)."""
    ids: list[list[int]]
    answers: list[str]
    tasks: list[str]
    examples: list[dict]
    too_long: int = 0   # left out: no room for a completion after them


def read_prompts(examples: list[dict], tokenizer, room: int, where: str) -> Prompts:
    """Examples -> Prompts; a prompt over `room` tokens is left out (and counted)."""
    prompts = Prompts([], [], [], [])
    for i, example in enumerate(examples):
        messages, answer, task = as_prompt(example, f"{where}[{i}]")
        ids = chat.prompt_ids(tokenizer, messages)
        if len(ids) > room:
            prompts.too_long += 1
            continue
        prompts.ids.append(ids), prompts.answers.append(answer), prompts.tasks.append(task)
        prompts.examples.append(example)
    return prompts


# ---------------------------------------------------------------- completions, scored


@torch.no_grad()
def complete(model: SmolLM2, tokenizer, prompts: Prompts, idx: list[int], G: int, params: SamplingParams,
             fns: list, seed: Optional[int] = None, sharded: bool = False) -> dict:
    """G completions of each prompt idx names, the G of a prompt consecutive -> a batch: inputs x and targets y
    (N, T) of prompt + completion rows (targets on the completion only, its end token included; rows padded at their
    end to the longest), the rewards (N,) and whether each completion is correct (every verifier's full credit)."""
    end, pad = chat.end_id(tokenizer), eos_token_id(tokenizer)
    ids = [prompts.ids[i] for i in idx for _ in range(G)]
    # sharded ranks all take every step (write_samples in train.py says why), cut at the end token afterwards
    outs = generate(model, ids, params, eos_id=None if sharded else end, seed=seed)
    outs = [o[:o.index(end) + 1] if end in o else o for o in outs]
    T = max(len(p) + len(o) for p, o in zip(ids, outs)) - 1
    x = torch.full((len(ids), T), pad, dtype=torch.long)
    y = torch.full((len(ids), T), chat_data.IGNORE, dtype=torch.long)
    rewards, correct = [], []
    for row, (p, o, i) in enumerate(zip(ids, outs, (i for i in idx for _ in range(G)))):
        seq = p + o
        x[row, :len(seq) - 1] = torch.tensor(seq[:-1])
        y[row, len(p) - 1:len(seq) - 1] = torch.tensor(o)   # position t predicts token t + 1
        text = tokenizer.decode([t for t in o if t != end])
        scores = [fn(text, prompts.answers[i], prompts.examples[i]) for fn in fns]
        rewards.append(sum(scores))
        correct.append(all(s >= 1 for s in scores))
    return {"x": x, "y": y, "rewards": torch.tensor(rewards, dtype=torch.float32),
            "correct": torch.tensor(correct, dtype=torch.float32)}


def completion_logprobs(model: torch.nn.Module, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (N, T) of the batch's targets under the model, and its entropy at each (N, T)."""
    x, y = to_device((batch["x"], batch["y"]), torch.device(device))
    logits, _ = model(x)                                                             # (N, T, V)
    return token_logprobs(logits, y)


# ---------------------------------------------------------------- the data: batches of completions


class Rollouts:
    """GRPO's data in stages.StagedLoader's interface. Each micro-batch is micro_batch_size / G prompts, read in a
    seeded order new each epoch, and their G completions each, sampled from the policy at the first of the mu steps
    that train on them, with a seed drawn from the prompt batch's number: the data position alone says what a
    step trains on. A checkpoint holds the position and, with mu > 1, the completions still to be trained on."""

    def __init__(self, task: "GRPO", prompts: Prompts, held_out: "HeldOut", cfg: Config, rank: int, world: int):
        self.task, self.prompts, self.held_out, self.rank, self.world = task, prompts, held_out, rank, world
        self.name, self.seed = task.args.dataset_name, cfg.general.seed
        self.order = Rows(np.arange(len(prompts.ids)), cfg.general.seed)
        self.per_batch = cfg.tokens.micro_batch_size // task.args.num_generations
        self.mu = task.args.num_iterations
        self.read = 0          # prompt batches this rank has sampled completions for
        self.step, self.micro = 1, 0
        self.generation, self.cache = -1, {}   # the batch of completions the steps of one cycle of mu share

    def begin_step(self, step: int) -> bool:
        self.step, self.micro = step, 0
        return False   # one stage throughout

    def next_batch(self) -> dict:
        generation, iteration = divmod(self.step - 1, self.mu)
        if generation != self.generation:
            if iteration:
                raise CheckpointError(f"step {self.step} trains on completions sampled at step "
                                      f"{self.step - iteration}, which the checkpoint does not hold for this "
                                      "number of processes; resume on as many processes as saved it")
            self.generation, self.cache = generation, {}
        if self.micro not in self.cache:
            number = self.read * self.world + self.rank   # the prompt batch's place among all ranks' batches
            self.read += 1
            idx = self.order.read(number * self.per_batch, self.per_batch).tolist()
            seed = int(np.random.SeedSequence([self.seed, number]).generate_state(1, np.uint64)[0])
            self.cache[self.micro] = self.task.rollout(self.prompts, idx, seed)
        self.micro += 1
        return self.cache[self.micro - 1]

    def validation(self) -> list:
        return [(self.name, 1.0, self.held_out)]

    def state_dict(self) -> dict:
        # every rank's completions, gathered (each rank calls save): rank 0 writes the state of all
        cached = gather({"generation": self.generation, "cache": self.cache}, self.task.rt) if self.mu > 1 else []
        return {"prompt_batches": self.read * self.world, "per_batch": self.per_batch, "cached": cached}

    def load_state_dict(self, state: dict) -> None:
        if state["per_batch"] != self.per_batch or state["prompt_batches"] % self.world:
            raise DataError(f"the data position ({state['prompt_batches']} batches of {state['per_batch']} prompts) "
                            f"does not fit {self.world} rank(s) of {self.per_batch} prompts; resume with the same "
                            "tokens.micro_batch_size and grpo.num_generations, on a world size that divides it")
        self.read = state["prompt_batches"] // self.world
        if len(state["cached"]) == self.world:
            self.generation, self.cache = state["cached"][self.rank]["generation"], state["cached"][self.rank]["cache"]


class HeldOut:
    """The held-out prompts as validation batches (train.py's validate reads tokens.limit_val_batches of them after
    reset()): one greedy reply each, its reward and whether it is correct, and each task's accuracy scaled so that
    the mean over the batches and ranks, which validate takes, is the accuracy over all of them."""

    def __init__(self, task: "GRPO", prompts: Prompts, cfg: Config, rank: int, world: int):
        self.task, self.prompts, self.rank, self.world = task, prompts, rank, world
        self.B, self.batches = cfg.tokens.micro_batch_size, cfg.tokens.limit_val_batches
        every = [i % len(prompts.ids) for i in range(self.B * world * self.batches)]   # what all ranks read
        self.names = sorted({prompts.tasks[i] for i in every})
        self.counts = torch.tensor([sum(prompts.tasks[i] == n for i in every) for n in self.names], dtype=torch.float)
        self.b = 0

    def reset(self) -> None:
        self.b = 0

    def next_batch(self) -> dict:
        first = (self.b * self.world + self.rank) * self.B
        idx = [(first + j) % len(self.prompts.ids) for j in range(self.B)]
        self.b += 1
        batch = self.task.rollout(self.prompts, idx, seed=None)
        hits = torch.tensor([sum(float(c) for c, i in zip(batch["correct"], idx) if self.prompts.tasks[i] == n)
                             for n in self.names])
        batch["accuracy"], batch["tasks"] = hits * self.batches * self.world / self.counts, self.names
        return batch


# ---------------------------------------------------------------- the task


class GRPO(SFT):
    """SFT's start and chat format; the data are prompts with checkable answers; the loss is GRPO's."""
    section = "grpo"
    reports_perplexity = False   # the validation loss is minus the held-out reward
    weighs_by_targets = False    # each micro-batch holds as many completions, and each loss_type is a mean over them
    warns_of_spikes = False      # a policy-gradient surrogate swings around 0: its size says nothing of health

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.args: GRPOArgs
        self.fns = verifiers.resolve(self.args.reward_funcs)
        self.policy: Optional[SmolLM2] = None
        self.reference: Optional[SmolLM2] = None
        self.gathered_once = False   # FSDP: whether the policy had a forward outside inference mode

    def data(self, cfg: Config, rt, tokenizer) -> Rollouts:
        self.cfg, self.rt, args = cfg, rt, self.args
        room = cfg.tokens.sequence_length - args.max_completion_length
        train, val = chat_data.held_out(args, cfg.general.seed)
        prompts, val_prompts = (read_prompts(e, tokenizer, room, f"{args.dataset_name}") for e in (train, val))
        if not prompts.ids or not val_prompts.ids:
            raise DataError(f"{args.dataset_name}: no prompt leaves room for grpo.max_completion_length="
                            f"{args.max_completion_length} tokens in tokens.sequence_length="
                            f"{cfg.tokens.sequence_length} ({prompts.too_long} too long); raise tokens.sequence_length")
        if rt.rank == 0:
            print(f"data: {len(prompts.ids):,} prompts from {args.dataset_name}, {args.num_generations} completions "
                  f"each, up to {args.max_completion_length} tokens; {len(val_prompts.ids):,} held out"
                  + (f"; {prompts.too_long} left out: longer than {room} tokens" if prompts.too_long else ""),
                  flush=True)
        # fit_schedule's epochs: a prompt's G completions are rows, each trained on for mu steps
        self.rows = len(prompts.ids) * args.num_generations * args.num_iterations
        return Rollouts(self, prompts, HeldOut(self, val_prompts, cfg, rt.rank, rt.world), cfg, rt.rank, rt.world)

    def model(self, cfg: Config, rt, resuming: Optional[dict]) -> SmolLM2:
        self.policy = super().model(cfg, rt, resuming)
        # copied before a resumed run loads its trained weights into the policy: the reference is always the start
        if self.args.beta:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        return self.policy

    @torch.no_grad()
    def rollout(self, prompts: Prompts, idx: list[int], seed: Optional[int]) -> dict:
        """Completions of the prompts idx names, scored: G sampled ones each with their advantages (and the
        log-probs of the policy that sampled them and of the reference, where mu > 1 and beta > 0 need them), or,
        without a seed, one greedy reply each (validation). On the CPU, so a checkpoint can hold them."""
        args, rt = self.args, self.rt
        sampled = seed is not None
        params = SamplingParams(max_new_tokens=args.max_completion_length, temperature=args.temperature if sampled
                                else 0.0, top_p=args.top_p if args.top_p < 1 else None)
        G, sharded = args.num_generations if sampled else 1, distributed.sharded(self.cfg, rt)
        # eager: layers compiled for training would recompile for every cached decode shape
        with rt.autocast(), torch.compiler.set_stance("force_eager"):
            if sharded and not self.gathered_once:
                # FSDP makes each layer's whole weights at its first forward and keeps those tensors; made inside
                # generate's inference mode they could never join a backward, so the first forward runs out of it
                self.policy(torch.tensor([prompts.ids[idx[0]][:1]], device=rt.device))
                self.gathered_once = True
            batch = complete(self.policy, self._tokenizer, prompts, idx, G, params, self.fns, seed, sharded)
            # an eval-mode model keeps its KV cache (validation): its buffers, made in inference mode, must not
            # reach the training forward, where DDP broadcasts every buffer
            self.policy.clear_cache()
            if sampled:
                batch["advantages"] = group_advantages(batch["rewards"], G, args.scale_rewards)
                if args.num_iterations > 1:
                    batch["old_logp"] = completion_logprobs(self.policy, batch, rt.device)[0].cpu()
                if args.beta:
                    batch["ref_logp"] = completion_logprobs(self.reference, batch, rt.device)[0].cpu()
        return batch

    def loss(self, run, batch: dict) -> tuple[torch.Tensor, dict]:
        if not run.net.training:   # validation: the held-out greedy replies, scored
            stats = {"reward": batch["rewards"].mean(), "accuracy": batch["correct"].mean()}
            stats |= {f"accuracy_{name}": a for name, a in zip(batch["tasks"], batch["accuracy"])}
            return -stats["reward"].to(run.rt.device), {k: v.to(run.rt.device) for k, v in stats.items()}
        args, device = self.args, run.rt.device
        logp, entropy = completion_logprobs(run.net, batch, device)
        mask = batch["y"].to(device) != chat_data.IGNORE
        old = batch["old_logp"].to(device) if "old_logp" in batch else logp.detach()   # mu = 1: the ratio is 1
        ref = batch["ref_logp"].to(device) if "ref_logp" in batch else logp.detach()   # beta = 0: no KL
        loss, stats = policy_loss(logp, old, ref, batch["advantages"].to(device), mask, args.beta, args.epsilon,
                                  args.loss_type, args.max_completion_length)
        groups = batch["rewards"].view(-1, args.num_generations)
        stats |= {"reward": batch["rewards"].mean(), "reward_std": groups.std(1).mean(),
                  "equal_groups": (groups == groups[:, :1]).all(1).float().mean(),
                  "completion_length": mask.sum(1).float().mean(),
                  "entropy": (entropy * mask).sum() / mask.sum().clamp(min=1)}
        return loss, {k: v.to(device) for k, v in stats.items()}


# ---------------------------------------------------------------- measuring: accuracy on held-out prompts


def score(cfg: Config, checkpoint: str, batch_size: int = 64) -> dict:
    """The greedy replies of a checkpoint to the config's held-out prompts: mean reward and accuracy, overall and per
    task. A checkpoint without chat tokens is scored as grpo.py would start from it."""
    args = dataclasses.replace(cfg.grpo, model_name_or_path=checkpoint)
    model, tokenizer, _ = start_from(copy.deepcopy(cfg), args)
    _, val = chat_data.held_out(args, cfg.general.seed)
    prompts = read_prompts(val, tokenizer, cfg.tokens.sequence_length - args.max_completion_length, args.dataset_name)
    params = SamplingParams(max_new_tokens=args.max_completion_length, temperature=0.0)
    fns, rewards, correct = verifiers.resolve(args.reward_funcs), [], []
    for i in range(0, len(prompts.ids), batch_size):
        idx = list(range(i, min(i + batch_size, len(prompts.ids))))
        batch = complete(model.eval(), tokenizer, prompts, idx, 1, params, fns)
        rewards += batch["rewards"].tolist()
        correct += batch["correct"].tolist()
    return {"checkpoint": args.model_name_or_path, "reward": sum(rewards) / len(rewards),
            "accuracy": sum(correct) / len(correct), "n": len(correct),
            "tasks": dict(sorted(per_task(prompts.tasks, correct).items()))}


def report(cfg: Config, checkpoint: str) -> str:
    r = score(cfg, checkpoint)
    tasks = ", ".join(f"{name} {acc:.2f}" for name, acc in r["tasks"].items())
    return (f"{r['checkpoint']}: accuracy {r['accuracy']:.3f}, reward {r['reward']:.3f} on {r['n']} held-out prompts "
            f"({tasks})")


def main(argv=None) -> int:
    return posttraining_command(argv, __doc__, GRPO, "each checkpoint's accuracy and reward (greedy replies) on the "
                                "config's held-out prompts, per task", report)


if __name__ == "__main__":
    sys.exit(main())
