"""GGUF metadata keys of the lexi-gguf contract (docs/gguf-contract.md). One place for every name."""

VERSION = "lexi.version"                        # str: lexi-gguf version that wrote the keys
ENABLE = "lexi.enable"                          # bool override: false = ignore per-layer counts
EXPERT_USED_COUNT = "lexi.expert_used_count"    # u32[block_count]: k per block, 0 on dense blocks
BASE_EXPERT_USED_COUNT = "lexi.base_expert_used_count"  # u32: the model's own k
METHOD = "lexi.method"                          # str: lexi-exact | lexi-evolutionary | manual
BUDGET = "lexi.budget"                          # f32: total / (moe layers * base k)
TOTAL = "lexi.total"                            # u32: sum of expert_used_count

LADDER_BUDGETS = "lexi.ladder.budgets"                      # f32[n]: budget fraction of each row
LADDER_TOTALS = "lexi.ladder.totals"                        # u32[n]: total of each row
LADDER_EXPERT_USED_COUNT = "lexi.ladder.expert_used_count"  # u32[n * block_count], row-major
BUDGET_INDEX = "lexi.budget_index"              # u32 (file or kv override int:N): run ladder row N
WEIGHT_NORM = "lexi.weight_norm"                # str (file or kv override str:X): renorm (default) | base
WEIGHT_NORMS = ("renorm", "base")

EXPERT_ORDER = "lexi.expert_order"              # u32[block_count * expert_count]: original expert id at each
                                                # position (export.relayout; identity rows on dense blocks)
TENSOR_KEYS = (EXPERT_ORDER,)                   # describe the tensors, not an allocation: `apply` keeps them

SENS_DEVIATION = "lexi.sensitivity.deviation"   # f32[block_count * base k], zeros on dense blocks
SENS_STDERR = "lexi.sensitivity.stderr"         # f32[block_count * base k]
SENS_SAMPLES = "lexi.sensitivity.samples"       # u32: token vectors per layer
SENS_SEED = "lexi.sensitivity.seed"             # u32
SENS_INPUT = "lexi.sensitivity.input"           # str: raw | rmsnorm | calib | calib-kld
SENS_SOURCE = "lexi.sensitivity.source"         # str: safetensors | gguf:<dequantized type>
SENS_WEIGHT_NORM = "lexi.sensitivity.weight_norm"  # str: the mode the table was profiled for (absent: lexi.weight_norm)


def arch_expert_used_count(arch: str) -> str:
    """The standard llama.cpp key, kept at the model's original scalar k."""
    return f"{arch}.expert_used_count"


def arch_expert_count(arch: str) -> str:
    return f"{arch}.expert_count"


def arch_block_count(arch: str) -> str:
    return f"{arch}.block_count"


# llama.cpp's own keys that lexi-gguf reads (gguf-py: Keys.Split)
SPLIT_NO = "split.no"                           # u16: this shard's index, 0-based
SPLIT_COUNT = "split.count"                     # u16: shards in the set
