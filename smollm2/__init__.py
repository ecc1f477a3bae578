"""The map of the package: everything the root's story and commands build on, one module per concern.

The root holds the story (model.py, data.py, train.py, generate.py) and the commands a user types (sft.py, dpo.py,
grpo.py, evaluation.py, convert_hf.py, validate_params.py, app.py). They import from here; nothing here imports a root
script but model.py. Each root file's docstring names the modules it builds on; this map says where everything else
lives.

Config
    config.py            the schema: nanotron's YAML sections, and ours (run, sampling, data_prep, s3, eval, sft,
                         dpo, grpo), as typed dataclasses; NO_EFFECT, the official keys accepted without effect
    config_load.py       YAML and key=value overrides in, a Config out: unknown keys refused by name, types converted
    config_checks.py     values that would crash a run or quietly change it refused by key path; notes() on the rest

Data
    sources.py           where documents come from (hub datasets, local files, the built-in corpus), tokenized in
                         batches, each ending with EOS, mixed by token count
    tokenizer.py         the tokenizer: trained here at first use, a local tokenizer.json or a Hub name, checked
    prepare.py           `python data.py prepare`: sources into token shards, validation held out per source
    shards.py            the shard file format, atomic writes, manifest.jsonl and its sha256 verification
    stages.py            nanotron's data_stages: the stage of each step, each stage's view of the config and folder
    streaming.py         a stage read as its hub sources stream, resumed from the `datasets` library's own position
    datatrove_folder.py  folders tokenized by datatrove (nanotron's format), read as tokens

Training
    task.py              what a run starts from, reads and minimises: the interface Pretraining, SFT, DPO and GRPO
                         fill in
    runtime.py           device, autocast precision, the torchrun process group, RNG states, stop signals
    optimizer.py         AdamW, and lr_at(step): nanotron's warmup / stable / decay schedule as a pure function
    distributed.py       DDP or FSDP2 by optimizer.zero_stage, the config's global batch kept, sharded checkpoints
    progress.py          what the loop remembers between steps (skipped updates, spikes, clocks) and the lines it prints
    metrics.py           log lines, tokens/s and MFU (the GPU table), metrics.jsonl, TensorBoard and W&B, loss.png
    planner.py           `train.py --plan`: memory per GPU, whether a run fits, the largest micro-batch, time and cost;
                         the recompute mode run.recompute auto takes

Checkpoints and storage
    checkpoint.py        checkpoints written atomically, read without running pickled code, listed, rotated and
                         resolved; Hugging Face directories read
    loading.py           load_model (any checkpoint, run, Hugging Face directory or s3:// path) and the device, dtype
                         and tokenizer a command asks for
    remote.py            S3: uploads in the background, each verified by sha256, downloads to resume or to load

Generation
    sampling.py          the one generation path: sampling, KV-cache decoding, the CPU weight layouts, TextStream
    quantize.py          weight-only int8 for decoding, one scale per output channel, PyTorch's int8 kernel

Post-training
    chat.py              SmolLM2's chat template, assistant-token masks, adding the chat tokens to a checkpoint
    chat_data.py         conversations and preference pairs: read, held out, tokenized and packed as rows
    chat_tasks.py        the built-in chat tasks, each with one checkable answer (SFT conversations, DPO pairs)
    verifiers.py         GRPO's rewards: exact, numeric and partial-credit checkers, registered by name
    grpo_loss.py         GRPO's maths: group-normalised advantages, the clipped policy-gradient loss, the k3 KL
    preference.py        the preference losses dpo.loss_type names (DPO, cDPO, IPO, hinge, APO-zero, SimPO, ORPO)

Evaluation
    evals.py             lm-evaluation-harness runs and their scores; BackgroundEvals, benchmarks beside a training run
    harness.py           our model as lm-eval's language model: log-likelihoods, rolling windows, generation
    scoring.py           the log-likelihood of token spans, batched by length; perplexity in windows of the context

The app
    app_models.py        the checkpoints under --checkpoint_dir, the cache of loaded models, text streamed from one
    app_handlers.py      what each request does (generate, chat, compare, status), every value it sends checked
    app_page.py          the page's components, laid out; app.py wires their events to the handlers
    confine.py           every file the app reads kept inside --checkpoint_dir, links followed

Errors and the command line
    errors.py            UserError and its subclasses, @command (one line, exit status 2), TrainingError, StoppedAtOnce
    cli.py               the command line train.py, sft.py, dpo.py and grpo.py share, and what a run's end says
"""
