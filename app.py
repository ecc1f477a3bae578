"""Show a model to people: `python app.py --checkpoint_dir runs/` serves a page to pick a checkpoint, type a prompt and
watch the text stream in, chat with a fine-tuned checkpoint, or run one prompt through several checkpoints side by side
next to their loss curves and benchmark scores.

It builds on smollm2/loading.py's load_model (tensors read with weights_only, so a crafted pickle runs no code) and
tokenizer opener, on smollm2/sampling.py's generate() with TextStream, and on smollm2/chat.py's template. Safe by
default: it listens on 127.0.0.1 unless --host or --share say otherwise, reads only what lies under --checkpoint_dir
(smollm2/confine.py: every file a load opens, symlinks resolved), checks every value a request sends, and caps the
prompt and the number of new tokens.

The page is three modules of the package: smollm2/app_models.py (which checkpoints, the model cache),
smollm2/app_handlers.py (what each request does, callable without a server) and smollm2/app_page.py (the layout);
this file wires the page's events to the handlers and starts the server.

Read next: smollm2/__init__.py, the map of the package every root file builds on, one module per concern.
"""

import argparse
import sys
from pathlib import Path

import gradio as gr

from smollm2.app_handlers import Handlers
from smollm2.app_models import ModelCache
from smollm2.app_page import Page, layout
from smollm2.errors import command
from smollm2.loading import pick_device, pick_dtype


def build_app(handlers: Handlers) -> gr.Blocks:
    """The page laid out, then each of its events wired to the handler that serves it."""
    with gr.Blocks(title="SmolLM2", analytics_enabled=False) as app:
        wire(layout(handlers), handlers)
    return app


def wire(page: Page, handlers: Handlers) -> None:
    """Which event calls which handler, with which components in and out, and the API name a client calls it by.

    preprocess=False: the handlers receive what a request sent, unconverted, and refuse a bad value themselves in one
    line (Gradio's own range checks would log a traceback for each).
    """
    gr.api(handlers.checkpoint_names, api_name="list_checkpoints")
    loading = [page.picked, page.weights]
    page.picked.change(handlers.status, loading, page.info, api_name="load", preprocess=False)
    page.weights.change(handlers.status, loading, page.info, api_visibility="private", preprocess=False)
    page.rescan.click(lambda: [gr.Dropdown(choices=handlers.checkpoints())] * 3, None,
                      [page.picked, page.several, page.chat_picked], api_visibility="private")

    generating = [page.picked, page.prompt, *page.controls]
    started = page.go.click(handlers.generate, generating, page.output, api_name="generate", preprocess=False)
    submitted = page.prompt.submit(handlers.generate, generating, page.output, api_visibility="private",
                                   preprocess=False)
    page.halt.click(None, cancels=[started, submitted])

    chatting = [page.chat_picked, page.message, page.conversation, page.system, *page.controls]
    said = page.send.click(handlers.converse, chatting, page.conversation, api_name="chat", preprocess=False)
    said_enter = page.message.submit(handlers.converse, chatting, page.conversation, api_visibility="private",
                                     preprocess=False)
    for event in (said, said_enter):
        event.then(lambda: "", None, page.message, api_visibility="private")   # the message box empties once sent
    page.halt_chat.click(None, cancels=[said, said_enter])
    page.forget.click(lambda: [], None, page.conversation, api_visibility="private")

    def compare(names, prompt, *controls):   # a column is shown when it has a header: one per checkpoint picked
        for heads, texts, *plots in handlers.compare(names, prompt, *controls):
            yield *[gr.Column(visible=bool(head)) for head in heads], *heads, *texts, *plots

    page.go_compare.click(compare, [page.several, page.compare_prompt, *page.controls],
                          [*page.columns, *page.heads, *page.texts, page.plot, page.scores, page.stats],
                          api_name="compare", preprocess=False)


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint_dir", default="runs", help="folder searched for checkpoints; nothing outside it "
                        "can be loaded")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on: 127.0.0.1 is this machine only, "
                        "0.0.0.0 every network it is on")
    parser.add_argument("--port", type=whole(1, 65535), default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--tokenizer", help="tokenizer.json or hub name for every checkpoint (default: the one found "
                        "with each checkpoint)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 (or fp16) on a GPU, fp32 on CPU")
    parser.add_argument("--cache_size", type=whole(1, 1000), default=3,
                        help="models kept loaded (in fp32, 135M takes 0.5 GB, 1.7B 7 GB)")
    parser.add_argument("--max_prompt_tokens", type=whole(1, 10**6), default=1024, help="longer prompts are refused")
    parser.add_argument("--max_new_tokens", type=whole(1, 10**6), default=512, help="the most one request may ask for")
    args = parser.parse_args(argv)
    root = Path(args.checkpoint_dir).resolve()
    if not root.is_dir():
        parser.error(f"--checkpoint_dir {args.checkpoint_dir}: no such directory (train.py writes runs under runs/)")
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    if args.host not in ("127.0.0.1", "localhost", "::1") or args.share:
        print("note: the app is reachable from other machines; anyone who reaches it can run the models")
    cache = ModelCache(root, args.cache_size, device, dtype, args.tokenizer)
    app = build_app(Handlers(cache, args.max_prompt_tokens, args.max_new_tokens))
    # fonts the browser already has: the page must not reach out to a font server, which may be unreachable
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    try:
        app.queue().launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme)
    except OSError as e:   # the port is taken, or the address is not this machine's
        parser.error(f"--port {args.port}: cannot listen there on {args.host} ({str(e).split('.')[0]}); pick another "
                     "--port")
    return 0


def whole(low: int, high: int):
    """An argparse type: a whole number from low to high."""
    def parse(text: str) -> int:
        if not text.strip().lstrip("-").isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {text!r}")
        return int(text)
    return parse


if __name__ == "__main__":
    sys.exit(main())
