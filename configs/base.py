"""Every default of a jaxdistill run, once. Recipe configs start from this and override.

  python -m jaxdistill.main --config=configs/<name>.py --workdir=DIR [--config.a.b=v ...]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # "train" | "eval" (init weights only) | "train_and_eval" (eval at the end) | "distill"
  # (the init weights as a teacher write verified traces: traces.*) | "demo" (the
  # distillation demo: configs/demo.py)
  c.mode = "train"
  c.seed = 0  # parameter init and data order

  # Initialisation, first that applies: resume from --workdir > init.checkpoint > init.hf_dir
  # > random init of model.preset.
  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ""  # Orbax checkpoint root, step directory, or another run's workdir
  c.init.hf_dir = ""  # Hugging Face directory (config.json + *.safetensors)

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # PRESETS name: random init, and the architecture to plan with
  c.model.param_dtype = "float32"  # parameter (and optimizer master) dtype
  c.model.compute_dtype = "bfloat16"  # matmul/activation dtype; float32 for exact tests
  c.model.remat = "none"  # "none" | "full" | "save_dots" | "save_dots_no_batch" | "offload_dots"
  # "auto" (splash on TPU, Pallas on GPU, dense/blockwise on CPU by length) | "dense" |
  # "blockwise" | "pallas_gpu" | "splash"; see jaxdistill/attention.py.
  c.model.attention = "auto"
  c.model.attention_block = 0  # 0: the platform's default (256 on CPU, 512 on accelerators)
  # Layers per iteration of the scan over layers; unrolled (num_layers) is faster for tiny
  # models on CPU, where the loop's own overhead is a large part of a step (configs/demo.py).
  c.model.scan_unroll = 1
  c.model.rope_theta = 0.0  # > 0 overrides the checkpoint's (long traces on Qwen2.5-Math)
  c.model.max_position_embeddings = 0  # > 0 overrides the checkpoint's
  # Architecture of a random init: > 0 replaces the preset's (never with init.* weights).
  # head_dim 0 follows d_model / num_heads when either of those is set.
  c.model.vocab_size = 0
  c.model.d_model = 0
  c.model.num_layers = 0
  c.model.num_heads = 0
  c.model.num_kv_heads = 0
  c.model.head_dim = 0
  c.model.mlp_dim = 0

  # Device mesh: (data, fsdp, context, tp) sizes; one may be -1 = all remaining devices.
  # context > 1 splits every sequence across devices (context parallelism, for long traces).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1, 1)

  c.data = ml_collections.ConfigDict()
  c.data.sources = ""  # comma-separated paths/globs; "path@weight" for a weighted mixture
  c.data.format = "auto"  # "auto" | "messages" | "sharegpt" | "s1k" | "problem_solution" | "openr1"
  # How records are read (jaxdistill/data/formats.py, FormatSpec). Renamed fields as
  # "canonical=theirs,...", e.g. "question=query,thinking_trajectories=reasoning,attempt=final"
  # or "messages=dialog,role=speaker,content=text" ("" = the canonical names).
  c.data.fields = ""
  c.data.thinking_open = "<think>\n"  # s1k: assistant turn = open + thinking + close + answer
  c.data.thinking_close = "\n</think>\n\n"
  c.data.system_prompt = ""  # system message for conversations without one ("" = none)
  c.data.s1k_variant = "auto"  # s1k pair: "auto" | "deepseek" | "gemini" | "original"
  c.data.tokenizer = ""  # HF tokenizer directory or SentencePiece .model (default: init.hf_dir)
  c.data.chat_template = "auto"  # "auto" | "tokenizer" | "chatml" | "llama3"
  c.data.seq_len = 2048  # tokens per packed row
  c.data.packing = "pack"  # "pack" (best-fit, several examples a row) | "pad" (one a row)
  c.data.overlong = "drop"  # "drop" | "truncate" (keeps the prompt)
  c.data.shuffle = True
  c.data.validation_sources = ""  # held-out traces for the validation loss (same syntax)
  c.data.workers = 0  # worker processes for tokenisation (0 = in the main process)
  c.data.prefetch = 2  # batches prepared ahead
  c.data.strict = False  # stop at the first bad record instead of skipping and counting it

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 8  # packed rows per optimizer step, all processes together
  c.train.micro_batches = 1  # gradient accumulation: the global batch in this many scans
  c.train.num_steps = 0  # optimizer steps; 0 = derived from num_epochs and the packed rows
  # (in mode="demo": 0 = the demo preset's)
  c.train.num_epochs = 1.0  # passes over the data when num_steps is 0
  c.train.lr = 1e-5  # peak learning rate
  c.train.warmup_ratio = 0.05  # share of the steps spent in linear warm-up
  c.train.schedule = "cosine"  # "cosine" | "linear" | "constant" after warm-up
  c.train.end_lr_ratio = 0.0  # final lr as a fraction of the peak
  c.train.weight_decay = 1e-4  # AdamW decoupled decay (never on norms and biases)
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0  # global-norm clip; 0 disables
  c.train.z_loss = 0.0  # coefficient of mean(logsumexp^2) added to the loss
  c.train.loss_chunk = 1024  # sequence tokens per output-head chunk in the loss
  c.train.log_every = 10  # steps between metric lines
  c.train.eval_every = 0  # steps between validation-loss passes (0 = never)
  c.train.eval_batches = 8  # validation batches per pass
  c.train.checkpoint_every = 500  # steps between checkpoints (also at the end and on SIGTERM)
  c.train.keep_checkpoints = 3  # most recent checkpoints kept
  c.train.async_checkpoints = True  # write checkpoints in the background
  c.train.profile_steps = (0, 0)  # [start, stop) steps traced by jax.profiler; (0, 0) = off
  c.train.compilation_cache_dir = ""  # persistent XLA compilation cache, e.g. ~/.cache/jaxdistill

  # Logit distillation (jaxdistill/distill.py): a frozen teacher of the same tokenizer runs
  # beside the student in every train step, on the same mesh; the loss adds
  # alpha * T^2 * KL(teacher_T || student_T) over the scored tokens. No teacher = plain SFT.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher_hf_dir = ""  # the teacher's Hugging Face directory ("" = none)
  c.distill.teacher_checkpoint = ""  # or its Orbax checkpoint / run workdir ("" = none)
  c.distill.teacher_param_dtype = "bfloat16"  # the teacher's weights on the devices
  c.distill.alpha = 1.0  # weight of T^2 x KL beside the NLL (0 = SFT, bit for bit)
  c.distill.temperature = 1.0  # T of both softmaxes in the KL

  c.eval = ml_collections.ConfigDict()
  c.eval.tasks = "aime24"  # comma-separated: aime24, aime25, amc23, math500
  c.eval.num_samples = 64  # samples per problem; pass@1 is their mean (avg@n)
  c.eval.temperature = 0.6
  c.eval.top_p = 0.95
  c.eval.top_k = 0  # 0 = off
  c.eval.max_new_tokens = 32768
  c.eval.greedy = True  # also one greedy sample per problem
  c.eval.batch_size = 8  # sampler slots: groups (a prompt x samples_at_once) decoding at once
  c.eval.samples_at_once = 0  # samples of one prompt per slot (0 = all num_samples); divides it
  c.eval.limit = 0  # first N problems per task (0 = all)
  c.eval.instruction = "Please reason step by step, and put your final answer within \\boxed{}."
  c.eval.seed = 0
  c.eval.compute_dtype = "float32"  # fp32 evaluation: bf16 can move AIME scores by points
  c.eval.cache_dtype = "float32"  # KV cache dtype
  c.eval.grading_workers = 2  # processes for symbolic (MATH) answer comparison
  # Budget forcing (s1): thinking is counted in tokens from the first generated one, up to
  # the first think_end; the texts are encoded by the run's tokenizer, each on its own.
  c.eval.think_end = "</think>"  # end-of-thinking delimiter (may be several tokens)
  c.eval.answer_cue = "\nFinal Answer:"  # forced after think_end at the maximum (s1's cue)
  c.eval.max_thinking_tokens = 0  # most thinking tokens per sample, then think_end (0 = off)
  c.eval.min_thinking_tokens = 0  # think_end after fewer is replaced by wait_text (0 = any)
  c.eval.wait_text = "Wait"  # what replaces an early think_end
  c.eval.max_waits = 0  # most replacements per sample (0 = no minimum forcing)
  # Comma-separated thinking budgets in tokens ("512,1024,2048"; "" = none): each task is
  # sampled again at each into <task>/budget_<B>/, and the report plots accuracy against them.
  c.eval.thinking_budgets = ""
  # Sample again over outputs that other weights or settings produced (a rerun with any of
  # them different is refused otherwise, naming the difference).
  c.eval.restart = False

  # Verified traces from a teacher (mode="distill", jaxdistill/traces.py): init.hf_dir or
  # init.checkpoint samples every problem with the eval.* sampling settings (temperature,
  # top_p, top_k, max_new_tokens, batch_size, samples_at_once, seed, instruction, budget
  # forcing, restart); each response is graded against the reference, kept by the policy and
  # written as a `messages` dataset (thinking wrapped in data.thinking_open/close).
  c.traces = ml_collections.ConfigDict()
  c.traces.problems_file = ""  # JSONL: a problem and its reference answer per line (required)
  # Renamed fields as "canonical=theirs,..." for id, problem, answer ("" = those names),
  # e.g. "problem=question,answer=gold". A missing id is the line number.
  c.traces.fields = ""
  c.traces.answer_kind = "math"  # how references are graded: "aime" | "amc" | "math"
  c.traces.num_samples = 4  # responses per problem (eval.samples_at_once must divide it)
  c.traces.keep = "all"  # "all" correct | "at_most_k" (first k correct) | "shortest" correct
  c.traces.k = 1  # at_most_k: the most traces kept per problem
  c.traces.decontaminate = True  # drop problems overlapping the bundled evaluation sets
  c.traces.output = ""  # output directory ("" = <workdir>/traces)

  # The distillation demo (mode="demo", jaxdistill/demo/run.py). Its student is model.*,
  # its training train.*; these settings are the demo's own: data, evaluation, length.
  c.demo = ml_collections.ConfigDict()
  # "default" | "long": training length, below; "distill": a default-preset run as the
  # teacher of a smaller student (demo.teacher_workdir, demo.student)
  c.demo.preset = "default"
  c.demo.num_traces = 0  # training traces (distill: fresh problems sampled); 0 = the preset's
  c.demo.presets = ml_collections.ConfigDict({
      "default": {"num_steps": 3000, "num_traces": 12000},
      "long": {"num_steps": 12000, "num_traces": 40000},
      # the students' steps; the fresh problems the teacher samples (traces.num_samples each)
      "distill": {"num_steps": 4000, "num_traces": 8000},
  })
  c.demo.families = "add,mul,lineq"  # comma-separated teacher families (demo/teacher.py)
  c.demo.eval_per_family = 40  # held-out problems per family
  c.demo.data_seed = 0  # problem draws (held-out and training streams)
  c.demo.vocab_size = 512  # SentencePiece vocabulary trained on the traces
  c.demo.max_new_tokens = 352  # generation budget; the longest answer (9999 * 9) is 332 tokens
  c.demo.eval_batch_size = 128  # prompts per sampler batch (the 120 held-out problems: one)
  c.demo.maj_k = 4  # samples per problem for maj@k (0 = skip)
  c.demo.maj_per_family = 20  # held-out problems per family scored by maj@k (the first ones)
  c.demo.maj_temperature = 0.7
  c.demo.maj_top_p = 0.95
  c.demo.untrained = True  # also score the randomly initialised student (greedy)
  # The distill preset (jaxdistill/demo/distill.py). The teacher samples with eval.temperature,
  # eval.top_p, eval.top_k and eval.seed, traces.num_samples per problem, kept by traces.keep
  # and traces.k; the lengths and sampler batch are demo.max_new_tokens and eval_batch_size.
  c.demo.teacher_workdir = ""  # a default-preset demo run ("" = <workdir>/teacher, made first)
  # The students, the distilled one and the control: a preset with at most half the teacher's
  # parameters; > 0 replaces the preset's field, as model.* does (vocab 0 = the tokenizer's).
  c.demo.student = ml_collections.ConfigDict()
  c.demo.student.preset = "demo_student_small"
  c.demo.student.vocab_size = 0
  c.demo.student.d_model = 0
  c.demo.student.num_layers = 0
  c.demo.student.num_heads = 0
  c.demo.student.num_kv_heads = 0
  c.demo.student.head_dim = 0
  c.demo.student.mlp_dim = 0
  return c
