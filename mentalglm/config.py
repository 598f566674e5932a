"""Typed configuration: every knob has one key, one default (here) and a type.

The YAML files under conf/ override only what differs. Each entry point's config (conf/train.yaml, ...) names its
schema first in its defaults list, so a misspelt key or a value of the wrong type, in a YAML file, an experiment
or on the command line, is an error instead of a silently ignored setting. Constructors take
these dataclasses (`as_config` also accepts a plain dict or DictConfig, checked the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf

from mentalglm.errors import ConfigError

T = TypeVar("T")


@dataclass
class TinyModelConfig:
    """An offline random GLM built into the cache (mentalglm/models/tiny.py)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int | None = None
    initializer_range: float = 0.1
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    pretrained: str | None = None  # a Hugging Face id or a local checkpoint directory
    chat: bool = False  # prompts through the tokenizer's chat template (else `base_template`)
    base_template: str = "{query}\n"
    system: str | None = None
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16 | auto
    attn_implementation: str | None = "sdpa"
    quantization: str | None = None  # 4bit | 8bit (bitsandbytes, QLoRA)
    gradient_checkpointing: bool = False
    # LM head + cross-entropy this many supervised positions at a time (null = all at once): bounds logits memory.
    loss_chunk_size: int | None = None
    trust_remote_code: bool = False
    tiny: TinyModelConfig | None = None


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    # Module names (a list) or a peft shorthand such as "all-linear".
    target_modules: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OptimizerConfig:
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.01
    scheduler: str = "linear"  # linear (warm-up then linear decay, the paper's) | cosine | constant


@dataclass
class VLLMConfig:
    """The vLLM server the project starts (mentalglm/serving/vllm.py), or one already running (base_url)."""

    base_url: str | None = None  # an OpenAI-compatible vLLM server already serving this model and adapter
    model: str = "mentalglm"  # the name the adapter is served under (on base_url, or on the server started here)
    # The Python that has vLLM (`make vllm` installs it into .venv-vllm, apart from the project's environment,
    # whose transformers it would downgrade); null = $MENTALGLM_VLLM_PYTHON, else .venv-vllm, else this Python.
    python: str | None = None
    dtype: str = "auto"  # auto: the model's dtype (float32 on a CPU: bf16 outputs differ from HF's)
    max_model_len: int | None = None  # null = data.max_length + the generation cap
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool | None = None  # null = true on a CPU (no CUDA graphs there)
    cpu_kvcache_space_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE on a CPU
    max_lora_rank: int = 64
    startup_timeout_s: int = 600
    concurrency: int = 32  # requests in flight at once from evaluate.py/predict.py
    extra_args: list[str] = field(default_factory=list)  # passed to the server as they are


@dataclass
class GenerationConfig:
    backend: str = "hf"  # hf | vllm: what evaluate.py, the final test of train.py and predict.py generate with
    max_new_tokens: int = 256  # test and evaluate: the full explanation
    val_max_new_tokens: int = 48  # in-loop validation: the label sentence
    # In-loop validation stops at the explanation marker (with its colon: a bare "推理" would cut 情绪化推理).
    val_stop_strings: list[str] = field(default_factory=lambda: ["推理：", "推理:", "Reasoning"])
    # In-loop validation: a prompt shorter than (1 - this) x its batch's longest starts a new batch. null = off.
    val_max_pad_fraction: float | None = 0.25
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class TaskDataConfig:
    """One entry of `data.tasks`: a task and its files."""

    definition: Any = None  # null = the built-in task of this name; else a task file path or an inline mapping
    stage: Any = None  # the stage (or list of stages) that trains on the task; null = none (evaluation only)
    train: str | None = None
    val: str | None = None
    val_size: Any = None  # carve val out of train: a count, or a fraction below 1
    test: str | None = None
    format: str | None = None  # null = the task's format (or detected from the file)
    hub_splits: dict[str, str] | None = None  # Hugging Face dataset ids: {train: train, val: validation, ...}
    # Pool the named splits and re-split them (seeded) into train and val: `val_fraction` of the pool to val.
    pool: list[str] | None = None
    val_fraction: float | None = None


@dataclass
class ScoresConfig:
    """Label likelihoods with every prediction, and calibrated risk scores (mentalglm/scoring/calibration.py)."""

    enabled: bool = False  # test, evaluate.py and predict.py score each label sentence beside generating
    calibration: str = "temperature"  # temperature | platt | none: fitted on the validation split, applied to test
    sensitivity: float = 0.9  # binary tasks: the triage threshold reaches this sensitivity on validation
    precision_at_k: list[int] = field(default_factory=lambda: [10, 50, 100])
    bins: int = 15  # reliability diagram and ECE
    # predict.py / serve.py: the calibration a test wrote (calibration.json); null = the run directory's, if any.
    calibration_file: str | None = None


@dataclass
class ValidationConfig:
    # generate: the label sentence is generated and parsed; likelihood: each label sentence is scored instead
    # (no generation; val/<task>/auroc is logged beside F1 for checkpoint selection).
    mode: str = "generate"


@dataclass
class DataConfig:
    name: str = MISSING
    # explained: every training task's answers state the label and then explain it (the paper's model; a task
    # whose training answers carry no explanation stops the run) | label_only: the label sentence alone, on
    # purpose (data=label_only; results.md and summary.json say so)
    answers: str = "explained"
    # The tasks, in report order: name -> a TaskDataConfig mapping (checked by `task_entries`; typed Any so a
    # whole entry can be added on the command line: +data.tasks.NAME={definition: ..., stage: two, train: ...}).
    tasks: dict[str, Any] = field(default_factory=dict)
    select: list[str] | None = None  # use only these of `tasks`, in this order (null = all)
    dirs: dict[str, str] = field(default_factory=dict)  # folders the file paths interpolate (${data.dirs.imhi})
    # Per-task template overrides, e.g. {sos_hl_1k: {query_template: "...{post}...", answer_template: "..."}}
    templates: dict[str, Any] = field(default_factory=dict)
    max_length: int = 1024
    batch_size: int = 4  # micro-batch (the paper: 4, with gradient accumulation 8)
    eval_batch_size: int = 32  # generation batch (val/test)
    batching: str = "grouped"  # grouped (length-grouped buckets) | packed (padding-free) | random
    # Each task's description (labels and definitions, the paper's Eq. 1 d) before the query. null: only when
    # evaluate.py runs a base model (zero/few-shot); true: everywhere (train, evaluate, predict, serve).
    task_description: bool | None = None
    bucket_batches: int = 100  # micro-batches per length-sorted bucket (grouped batching)
    num_workers: int = 0
    on_error: str = "raise"  # raise | skip (skips are counted and reported)
    on_leak: str = "warn"  # warn | error: the same post in two splits
    limit_eval: int | None = None  # cap val/test items per task (quick checks)
    # The default of every IMHI entry's `pool` / `val_fraction` (conf/data/label_only.yaml interpolates them):
    # data.pool=[train,val,test] data.val_fraction=0.1 is the paper's Table 1 recipe.
    pool: list[str] | None = None
    val_fraction: float | None = None


@dataclass
class StageConfig:
    max_epochs: int = MISSING
    # Where the stage's adapter starts: `base` (a fresh adapter on the base model), the name of an earlier stage
    # (its best adapter: from this run when it ran before in the chain, else the stage registry), or an adapter
    # directory.
    init: str = "base"
    merge_init: bool = False  # true: merge the adapter it starts from into the base and train a fresh one


@dataclass
class RunConfig:
    """What every entry point's primary config holds (conf/<entry>.yaml names its schema first)."""

    task_name: str = MISSING  # the entry point: train, evaluate, ...
    experiment_name: str = "default"  # W&B group and output sub-folder
    seed: int = 42
    log_text: bool = False  # W&B tables of sample model outputs (never the posts)
    # Keys (beside credential-like ones: hf_token, *_api_key, *_secret, password, ...) whose values no file a run
    # writes may hold; pass credentials through the environment instead.
    secret_keys: list[str] = field(default_factory=list)
    # run_dir= / adapter=: settings that contradict the run the adapter was trained with (other base model,
    # templates, ...) are an error unless this is true (mentalglm/runtime/run_card.py)
    force: bool = False
    paths: Any = MISSING
    model: ModelConfig = MISSING
    lora: LoraConfig | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    data: DataConfig = MISSING
    trainer: Any = MISSING
    logger: Any = None
    local: Any = None  # conf/local/default.yaml, if a user keeps machine-specific settings there


@dataclass
class TrainConfig(RunConfig):
    task_name: str = "train"
    # The stages this run trains, in order (`stage=` and `variant=` configs set it), and its name in reports.
    chain: list[str] = field(default_factory=lambda: ["two"])
    variant: str | None = None
    stages: dict[str, StageConfig] = field(default_factory=dict)
    test: bool = True  # test the last stage's best adapter on every selected task that has a test file
    # The test judges the label-explanation consistency of the model's answers with a TF-IDF classifier fitted on
    # the run's training explanations (explained data only; needs scikit-learn)
    consistency: bool = True
    ckpt_path: str | None = None  # a checkpoint to continue from, or "last" (= resume=true)
    resume: Any = False  # true (the newest unfinished run of this experiment), or a run directory
    max_bad_steps: int = 20  # consecutive non-finite losses (skipped steps) before the run stops
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    callbacks: Any = None


@dataclass
class BertScoreConfig:
    """BERTScore of the explanations (mentalglm/scoring/text_metrics.py): off while `model` is null."""

    model: str | None = None  # a hub id (e.g. bert-base-chinese) or a local encoder directory
    num_layers: int | None = None  # the layer whose embeddings are matched (null: bert_score's default)
    batch_size: int = 32


@dataclass
class EvaluateConfig(RunConfig):
    task_name: str = "evaluate"
    adapter: str | None = None  # a LoRA adapter directory
    run_dir: str | None = None  # a train.py run directory: its last stage's best adapter
    predictions: str | None = None  # score this JSONL file of outputs, no model
    on_duplicate: str = "error"  # a predictions file repeating an item: error | keep_first
    report: str | None = None  # ablation: rebuild a sweep's table (sweep_dir=) | paper: the paper's tables
    sweep_dir: str | None = None
    table: str = "table4"  # report=paper: table4 | table3 | table5 | tableS1 (conf/paper/mentalglm.yaml)
    # report=paper: [{name, path (metrics.json, run dir or predictions JSONL), paper, param, data (what it is on)}]
    rows: Any = None
    split: str = "test"  # test | val
    shots: int = 0  # k solved training examples in each prompt (zero/few-shot baselines)
    # strict | free (mentalglm/scoring/parsing.py); null: free for a base model (zero/few-shot), strict with an
    # adapter, and for predictions= each row's `parser` field (strict when absent)
    parser_mode: str | None = None
    # A classifier directory (train_classifier.py): answers the parser cannot read are labelled from their
    # explanation; results report rule-only and with-fallback metrics side by side
    label_fallback: str | None = None
    # Tokens of the explanation metrics (BLEU-4, ROUGE): char (CJK characters, Latin words) | jieba | whitespace
    explanation_tokenizer: str = "char"
    explanation_bertscore: BertScoreConfig = field(default_factory=lambda: BertScoreConfig())
    save_inputs: bool = False  # write each prompt (with the post) into predictions.jsonl
    resume: Any = False  # true: continue the newest interrupted evaluation, keeping its written predictions
    output_dir: str = MISSING


@dataclass
class PredictConfig(RunConfig):
    task_name: str = "predict"
    adapter: str | None = None
    run_dir: str | None = None
    text: str | None = None  # one post
    input: str | None = None  # a JSONL or CSV file of posts
    text_field: str = "text"  # the column (CSV) or field (JSONL) holding the post
    id_field: str = "id"  # the column or field holding an item id (row number when absent)
    task: str | None = None  # the task of every item; null = each row's `task` field
    aspect: str | None = None
    output: str | None = None  # null = predictions.jsonl in the run directory
    resume: Any = False
    # Posts typed (or piped) line by line, each answered at once on the console; nothing is written unless output=.
    interactive: bool = False
    output_dir: str = MISSING


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "hf"  # hf (the project's batched generation) | vllm
    model_name: str = "mentalglm"  # the model id clients ask for
    # Required whenever the server listens beyond loopback: clients send `Authorization: Bearer <key>`.
    api_key_env: str = "MENTALGLM_API_KEY"
    max_batch_size: int = 16  # hf: concurrent requests generated together
    max_wait_ms: float = 10.0  # hf: how long the first request of a batch waits for company
    queue_size: int = 64  # waiting requests; beyond, 503 with Retry-After
    timeout_s: float = 300.0  # per request
    # Cap on a request's max_tokens (and its default): at least build_data's teacher.max_tokens, so serve.py can be
    # the teacher with both defaults.
    max_tokens: int = 1024
    # Chat and completion prompts (a teacher prompt carries definitions and expert examples: longer than a training
    # prompt); /v1/classify prompts are held to data.max_length, as the model was trained.
    max_prompt_tokens: int = 8192
    retry_after_s: int = 2
    # A body past this is refused (413) before more of it is read: 8192 tokens of prompt are well under 1 MiB.
    max_body_bytes: int = 1_048_576
    max_choices: int = 8  # a request's n
    # More adapters of the same base, each under its own model id: {id: adapter dir or train.py run dir}. Each
    # renders prompts as its own run was trained (its run card); the hf backend switches adapters per batch.
    # (Any, not a dict: Hydra's struct mode would refuse `serve.adapters={name:path}` adding keys to an empty dict.)
    adapters: Any = None
    base_model_name: str | None = None  # also serve the base model alone under this id


@dataclass
class ServeConfig(RunConfig):
    task_name: str = "serve"
    adapter: str | None = None
    run_dir: str | None = None
    serve: ServeSettings = field(default_factory=ServeSettings)
    output_dir: str = MISSING


@dataclass
class ExportConfig(RunConfig):
    task_name: str = "export"
    adapter: str | None = None
    run_dir: str | None = None
    output: str | None = None  # the merged checkpoint directory (null = merged/ in the run directory)
    dtype: str | None = None  # save in this dtype (null = the model's)
    check_tolerance: float = 1.0e-4  # merged vs adapter logits, max absolute difference allowed
    output_dir: str = MISSING


@dataclass
class TeacherConfig:
    """An OpenAI-compatible chat API (mentalglm/teacher/client.py): a local vLLM, serve.py, GLM-4-plus, GPT-4, ..."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "mentalglm"
    # The environment variable holding the API key (null = none); the key itself is never in a config or log.
    api_key_env: str | None = "MENTALGLM_TEACHER_API_KEY"
    allow_remote: bool = False  # posts leave this machine only with true (any base_url off loopback)
    system: str | None = None  # a system message before every prompt
    # Deterministic by default: greedy, a fixed seed (servers that honour it).
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    max_tokens: int = 1024
    concurrency: int = 8  # requests in flight at once
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    timeout_s: float = 120.0  # per request
    max_retries: int = 6  # on 429, 5xx, timeouts, dropped connections and malformed or empty answers
    backoff_s: float = 1.0  # first retry delay; doubles each retry (with jitter) unless Retry-After says
    max_backoff_s: float = 60.0
    # Price per million tokens, for the estimated cost in the report.
    price_per_million_input: float = 0.0
    price_per_million_output: float = 0.0
    currency: str = "USD"


@dataclass
class TinyEncoderConfig:
    """An offline random BERT built into the cache (mentalglm/models/tiny_bert.py)."""

    vocab_size: int = 3000
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    seed: int = 0


@dataclass
class ClassifierConfig:
    """conf/classifier: what train_classifier.py fits per task."""

    name: str = MISSING
    kind: str = "tfidf"  # tfidf: TF-IDF + logistic regression, no weights | encoder: a fine-tuned BERT-family model
    c: float = 10.0  # tfidf: inverse regularisation strength of the logistic regression
    # encoder: a hub id or local directory (or `tiny`: an offline random BERT), trained as Appendix C says
    pretrained: str | None = None
    tiny: TinyEncoderConfig | None = None
    trust_remote_code: bool = False
    max_length: int = 512
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-5
    weight_decay: float = 0.0
    threshold: float = 0.5  # multi-label and hierarchical tasks: a label is predicted above this probability


@dataclass
class DataCommandConfig:
    """What the entry points that read data but load no LLM hold (train_classifier, expert_eval, build_data)."""

    task_name: str = MISSING
    experiment_name: str = "default"
    seed: int = 42
    secret_keys: list[str] = field(default_factory=list)  # as RunConfig.secret_keys
    paths: Any = MISSING
    data: DataConfig = MISSING
    local: Any = None
    output_dir: str = MISSING


@dataclass
class TrainClassifierConfig(DataCommandConfig):
    """train_classifier.py: a classifier per task (mentalglm/commands/train_classifier.py)."""

    task_name: str = "train_classifier"
    run_dir: str | None = None  # a train.py run: its data config (task set, files, templates) is used
    force: bool = False  # as RunConfig.force
    input: str = "explanation"  # explanation (-> label: consistency, label fallback) | post (-> label: a baseline)
    classifier: ClassifierConfig = MISSING
    examples: dict[str, Any] = field(default_factory=dict)  # task -> expert-example file, scored as split "expert"
    trainer: Any = None  # encoder: the Lightning Trainer
    logger: Any = None


@dataclass
class ExpertEvalConfig(DataCommandConfig):
    """expert_eval.py: sample, blind, rate and aggregate expert ratings (mentalglm/commands/expert_eval.py)."""

    task_name: str = "expert_eval"
    action: str = "sample"  # sample | rate | aggregate
    predictions: dict[str, str] = field(default_factory=dict)  # sample: model name -> predictions JSONL
    split: str = "test"  # sample: the split the predictions answer (its items' posts, its task sizes)
    size: int = 100  # sample: items, stratified by task in proportion to the split's size
    per_task: dict[str, int] = field(default_factory=dict)  # sample: task -> items, instead of `size`
    raters: list[str] = field(default_factory=lambda: ["rater_1", "rater_2"])
    # dimension -> {description, min, max}, in the sheet's column order
    rubric: dict[str, Any] = field(default_factory=dict)
    overall_of: list[str] = field(default_factory=list)  # overall = the mean of these dimensions ([]: none)
    agreement_level: str = "ordinal"  # Krippendorff's alpha: nominal | ordinal | interval | ratio
    # sample: a train.py run (its data, and its test answers unless predictions are given); rate / aggregate: the
    # folder action=sample wrote
    run_dir: str | None = None
    key: str | None = None  # aggregate: the key file (null: run_dir/key.csv)
    sheets: list[str] = field(default_factory=list)  # aggregate: filled sheets (empty: run_dir/sheets/*.csv)
    rater: str | None = None  # rate: whose sheet the page shows
    host: str = "127.0.0.1"  # rate: the page is for this machine unless the study says otherwise
    port: int = 8765


@dataclass
class BuildDataConfig:
    """build_data.py: explanation data from a teacher LLM, its revision, IMHI translation, API-LLM baselines."""

    task_name: str = "build_data"
    # explain: labelled data -> explanation-bearing instruction JSONL (+ a revision sheet)
    # merge: a revised sheet back into an explain run's files; translate: IMHI -> Chinese;
    # baseline: the teacher answers a test split zero/few-shot, scored like any predictions file
    action: str = "explain"
    experiment_name: str = "default"
    seed: int = 42
    secret_keys: list[str] = field(default_factory=list)
    paths: Any = MISSING
    data: DataConfig = MISSING
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])  # explain/translate: these
    instructions: dict[str, Any] = field(default_factory=dict)  # task -> instruction text file
    examples: dict[str, Any] = field(default_factory=dict)  # task -> expert-example file (any readable format)
    examples_per_label: int | None = None  # null = every expert example (the paper); else each label this often
    on_disagree: str = "revise"  # revise (a sheet for experts) | drop | keep (the teacher's answer as written)
    # Templates by language (zh/en): explain, example, translate, baseline, shot.
    prompts: dict[str, Any] = field(default_factory=dict)
    translate: dict[str, str] = field(default_factory=dict)  # translate: source task -> its Chinese task
    shots: int = 0  # baseline: k solved training examples in each prompt
    split: str = "test"  # baseline: the split answered
    run_dir: str | None = None  # merge: the explain run whose files take the revisions
    sheet: str | None = None  # merge: the revised sheet (null = revision.csv in run_dir)
    output: str | None = None  # the folder the data files go to (null = the run directory)
    cache: str = MISSING  # every teacher answer, appended as it arrives (resume after any interruption)
    logger: Any = None
    local: Any = None
    output_dir: str = MISSING


SCHEMAS = {
    "train_schema": TrainConfig,
    "evaluate_schema": EvaluateConfig,
    "predict_schema": PredictConfig,
    "serve_schema": ServeConfig,
    "export_schema": ExportConfig,
    "build_data_schema": BuildDataConfig,
    "train_classifier_schema": TrainClassifierConfig,
    "expert_eval_schema": ExpertEvalConfig,
}


def register_configs() -> None:
    """Put the entry points' schemas in Hydra's ConfigStore; conf/<entry>.yaml lists its schema first."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        cs.store(name=name, node=schema)


def as_config(schema: type[T], value: Any) -> T:
    """`value` (a `schema` instance, a dict or a DictConfig) as a `schema` instance, checked: unknown keys and
    values of the wrong type are a ConfigError."""
    if isinstance(value, schema):
        return value
    if value is None:
        value = {}
    try:
        if is_dataclass(value):
            value = OmegaConf.structured(value)
        merged = OmegaConf.merge(OmegaConf.structured(schema), value)
        return OmegaConf.to_object(merged)
    except Exception as e:  # omegaconf's ValidationError / ConfigKeyError
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{schema.__name__}: {first}") from None


def task_entries(data: DataConfig | Any) -> dict[str, TaskDataConfig]:
    """`data.tasks`, each entry checked against TaskDataConfig (a misspelt key is an error naming the task)."""
    tasks = data.tasks if not isinstance(data, dict) else data.get("tasks", {})
    out = {}
    for name, entry in (tasks or {}).items():
        if isinstance(entry, TaskDataConfig):
            out[name] = entry
            continue
        try:
            out[name] = as_config(TaskDataConfig, entry)
        except ConfigError as e:
            raise ConfigError(f"data.tasks.{name}: {str(e).split(': ', 1)[-1]}") from None
    return out


def to_dict(value: Any) -> dict:
    """A config (dataclass, DictConfig or dict) as plain, resolved data."""
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    if is_dataclass(value):
        return OmegaConf.to_container(OmegaConf.structured(value), resolve=True)
    return dict(value or {})
