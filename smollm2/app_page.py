"""The app's page: every component, laid out once, and handed back by name for app.py's wiring.

Gradio needs a component declared before an event can name it, so the compare view lays out COMPARE_SLOTS columns up
front and a request shows as many as it fills. The sampling controls are built from CONTROLS, the table the handlers
check each request's values against, so the page and the checks cannot disagree on a range.
"""

from dataclasses import dataclass

import gradio as gr

from smollm2 import chat
from smollm2.app_handlers import (CHARS_PER_TOKEN, COMPARE_SLOTS, CONTROLS, FULL, WHOLE, Handlers, eval_curves,
                                  loss_curves, statistic_curves)


@dataclass
class Page:
    """The components an event reads or writes, tab by tab, then the side panel's controls."""
    picked: gr.Dropdown   # Generate
    rescan: gr.Button
    info: gr.Markdown
    prompt: gr.Textbox
    go: gr.Button
    halt: gr.Button
    output: gr.Textbox
    chat_picked: gr.Dropdown   # Chat
    conversation: gr.Chatbot
    message: gr.Textbox
    system: gr.Textbox
    send: gr.Button
    halt_chat: gr.Button
    forget: gr.Button
    several: gr.Dropdown   # Compare
    compare_prompt: gr.Textbox
    go_compare: gr.Button
    columns: list[gr.Column]
    heads: list[gr.Markdown]
    texts: list[gr.Textbox]
    plot: gr.LinePlot
    scores: gr.LinePlot
    stats: gr.LinePlot
    sampling: list[gr.Slider | gr.Number]   # in CONTROLS' order
    weights: gr.Radio

    @property
    def controls(self) -> list:
        """What every generating handler takes after its own values: the sampling controls, then the weights switch."""
        return [*self.sampling, self.weights]


def layout(handlers: Handlers) -> Page:
    """Lay the page out inside the current gr.Blocks: three tabs (Generate, Chat, Compare) beside the sampling panel."""
    choices = handlers.checkpoints()
    first = choices[0][1] if choices else None
    typed = CHARS_PER_TOKEN * handlers.max_prompt_tokens   # the most characters a prompt box takes
    gr.Markdown(f"## SmolLM2 · checkpoints under `{handlers.root}`")
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Tab("Generate"):
                with gr.Row():
                    # custom values are allowed so that a name typed or sent over the API reaches resolve_under, the
                    # one check that decides what may be loaded
                    picked = gr.Dropdown(choices, value=first, label="Checkpoint", allow_custom_value=True, scale=5,
                                         elem_id="checkpoint")
                    rescan = gr.Button("↻ Rescan", scale=1, min_width=80)
                info = gr.Markdown(handlers.status(first) if first else "no checkpoints found under this directory")
                prompt = gr.Textbox(label="Prompt", lines=4, max_length=typed, placeholder="Once upon a time",
                                    elem_id="prompt")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    halt = gr.Button("Stop")
                output = gr.Textbox(label="Generated text", lines=8, interactive=False, elem_id="output")
            with gr.Tab("Chat"):
                chat_picked = gr.Dropdown(choices, value=first, label="Checkpoint (fine-tuned by sft.py or dpo.py)",
                                          allow_custom_value=True, elem_id="chat_checkpoint")
                conversation = gr.Chatbot(label="Conversation", render_markdown=False, elem_id="chatbot")
                message = gr.Textbox(label="Message", lines=2, max_length=typed, placeholder="What is 12 + 30?",
                                     elem_id="message")
                system = gr.Textbox(label="System message", placeholder=chat.DEFAULT_SYSTEM, lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    halt_chat = gr.Button("Stop")
                    forget = gr.Button("New conversation")
            with gr.Tab("Compare"):
                several = gr.Dropdown(choices, multiselect=True, max_choices=COMPARE_SLOTS, allow_custom_value=True,
                                      label=f"Checkpoints (2 to {COMPARE_SLOTS})")
                compare_prompt = gr.Textbox(label="Prompt", lines=3, max_length=typed)
                go_compare = gr.Button("Compare", variant="primary")
                columns, heads, texts = [], [], []
                with gr.Row():
                    for _ in range(COMPARE_SLOTS):
                        with gr.Column(min_width=200, visible=False) as column:
                            columns.append(column)
                            heads.append(gr.Markdown())
                            texts.append(gr.Textbox(label="Generated text", lines=8, interactive=False))
                plot = gr.LinePlot(loss_curves(handlers.root, {}), x="step", y="loss", color="series",
                                   title="Loss curves of the compared runs", y_title="loss (nats/token)")
                scores = gr.LinePlot(eval_curves(handlers.root, {}), x="step", y="score", color="series",
                                     title="Benchmark scores of the compared runs (evaluation.py during training)",
                                     y_title="score")
                stats = gr.LinePlot(statistic_curves(handlers.root, {}), x="step", y="value", color="series",
                                    title="Post-training statistics of the compared runs (held-out accuracy per task, "
                                          "reward, KL)", y_title="value")
        with gr.Column(scale=1, min_width=240):
            sampling, weights = side_panel(handlers.max_new_tokens)
    return Page(picked=picked, rescan=rescan, info=info, prompt=prompt, go=go, halt=halt, output=output,
                chat_picked=chat_picked, conversation=conversation, message=message, system=system, send=send,
                halt_chat=halt_chat, forget=forget, several=several, compare_prompt=compare_prompt,
                go_compare=go_compare, columns=columns, heads=heads, texts=texts, plot=plot, scores=scores, stats=stats,
                sampling=sampling, weights=weights)


def side_panel(max_new_tokens: int) -> tuple[list, gr.Radio]:
    """The sampling controls, one per CONTROLS entry in its order, and the weights switch (as stored, or int8)."""
    gr.Markdown("### Sampling")
    top = max(2, max_new_tokens)   # a slider needs its maximum above its minimum; requests are capped
    sampling = [gr.Slider(low, high or top, value=min(default, high or max_new_tokens),
                          step=1 if key in WHOLE else 0.05, label=label, info=hint, elem_id=key)
                if key != "seed" else gr.Number(default, precision=0, minimum=low, label=label, info=hint)
                for key, (label, low, high, default, hint) in CONTROLS.items()]
    gr.Markdown("### Weights")
    weights = gr.Radio([("as stored", FULL), ("int8: faster on a CPU", "int8")], value=FULL, show_label=False,
                       elem_id="weights", info="int8 quantizes every matrix as the checkpoint loads (quantize.py)")
    return sampling, weights
