"""Our model as an lm-evaluation-harness language model, so any of the harness's benchmarks can score a checkpoint.

The harness asks a model three things (lm_eval.api.model.LM): the log-likelihood of a continuation after a context
(multiple choice: the answer the model finds likeliest), the rolling log-likelihood of a whole text (perplexity
tasks), and a continuation generated until a stop string (generative tasks). Its TemplateLM base class turns
(context, continuation) strings into tokens the way the harness's own `hf` model does (the two encoded together, a
trailing space of the context moved into the continuation), and everything past tokenization copies `hf`'s rules
(left truncation to the context, the BOS/EOS prefix, stop strings), so the scores equal `hf`'s on an exported
directory item by item. The answers come from scoring.score() and sampling.generate(), the repository's one scoring
and one decoding path. Importing this file needs lm_eval installed; evals.require_harness checks that first.
"""

import json
from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tokenizers import Tokenizer
from tqdm import tqdm

from model import SmolLM2
from smollm2 import chat
from smollm2.sampling import SamplingParams, TextStream, generate
from smollm2.scoring import Request, rolling_windows, score

MAX_GEN_TOKS = 256   # what `hf` generates when a task does not say


class HarnessModel(TemplateLM):
    def __init__(self, model: SmolLM2, tokenizer: Tokenizer, eos_id: int, bos_id: Optional[int] = None,
                 batch_size: int = 8, max_length: Optional[int] = None, seed: int = 1234):
        super().__init__()
        self.model, self.tok, self.batch = model, tokenizer, batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        self.eos_id, self.seed = eos_id, seed
        self.prefix_id = bos_id if bos_id is not None else eos_id   # `hf`: the tokenizer's BOS, else its EOS
        self._device = model.lm_head.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.prefix_id

    @property
    def tokenizer_name(self) -> str:
        return "smollm2"

    def chat_template(self, chat_template=False) -> str:
        """The template lm-eval records (and keys its request cache by) when it renders prompts as chats."""
        return chat.CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """lm-eval's turns (few-shot examples as earlier turns, the item last) as SmolLM2's chat text, rendered by
        the one template function; without a generation prompt the last (assistant) message is left open, as `hf`
        renders it with transformers' continue_final_message."""
        return chat.render(chat_history, add_generation_prompt=add_generation_prompt,
                           continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        if add_special_tokens is None:   # as `hf`: a text that already starts with the prefix token gets no other
            add_special_tokens = not string.startswith(self.tok.decode([self.prefix_id], skip_special_tokens=False))
        return self.tok.encode(string, add_special_tokens=add_special_tokens).ids

    def _score(self, requests: list[Request], what: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        with tqdm(total=len(requests), desc=what, disable=disable_tqdm) as bar:
            return score(self.model, requests, self.batch, bar.update)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(context tokens, continuation tokens) -> (log p(continuation | context), is it the greedy continuation);
        a pair longer than the context loses its oldest tokens, as in `hf`."""
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's context of "
                                 f"{self.max_length}")
        return self._score([((ctx + cont)[-(self.max_length + 1):], len(cont)) for _, ctx, cont in requests],
                           "loglikelihood", disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, scored in windows of the context (scoring.rolling_windows)."""
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for window in rolling_windows(self.tok_encode(text), self.prefix_id, self.max_length):
                windows.append(window)
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, EOS or max_gen_toks, through sampling.generate; requests that
        share their generation settings run as one left-padded batch."""
        groups: dict[str, list[int]] = {}
        by_length = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))   # little padding per batch
        for i in by_length:
            groups.setdefault(json.dumps(requests[i].args[1], sort_keys=True, default=str), []).append(i)
        eos_text = self.tok.decode([self.eos_id], skip_special_tokens=False)
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], MAX_GEN_TOKS)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                new = kwargs["max_gen_toks"]
                if new >= self.max_length:
                    raise ValueError(f"the task asks for {new} new tokens; the model's context is {self.max_length}")
                params = SamplingParams(max_new_tokens=new,
                                        temperature=kwargs.get("temperature", 0.0) if kwargs["do_sample"] else 0.0,
                                        top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"))
                for first in range(0, len(indices), self.batch):
                    chunk = indices[first:first + self.batch]
                    # the newest tokens of a long context stay, leaving room for the new ones
                    prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - new):] for i in chunk]
                    stream = TextStream(self.tok, len(chunk), until, self.eos_id)
                    generate(self.model, prompts, params, self.eos_id, self.seed, on_tokens=stream)
                    for i, text in zip(chunk, stream.close()):
                        out[i] = text
                    bar.update(len(chunk))
        return out
