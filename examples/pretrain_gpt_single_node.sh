#!/usr/bin/env bash
# Pretrain a GPT with mHC (n=4 residual streams) on one machine with N GPUs.
#
# Layout with the default 8 GPUs: TP=2 (+ sequence parallel) x PP=2 with 2 virtual stages
# per rank (interleaved 1F1B) x DP=2, distributed optimizer, bf16, Transformer Engine layers.
# The interleaved schedule needs overlap_p2p_comm=True, batch_p2p_comm=False: the entry
# point sets both itself whenever --num-layers-per-virtual-pipeline-stage is given.
#
# Run from the repository root (or with the package installed):
#   DATA_PATH=data/corpus_text_document VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt \
#       bash examples/pretrain_gpt_single_node.sh
# Extra arguments are passed on to the entry point (they override the flags below).
set -euo pipefail

: "${DATA_PATH:?set DATA_PATH to a .bin/.idx prefix (or '[w1] p1 [w2] p2 ...'), see tools/preprocess_data.py}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-2}
PP=${PP:-2}
LAYERS_PER_VIRTUAL_STAGE=${LAYERS_PER_VIRTUAL_STAGE:-6}  # 24 layers / PP 2 / 6 = 2 virtual stages
NUM_RESIDUAL_STREAMS=${NUM_RESIDUAL_STREAMS:-4}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}  # micro-batches per step must be divisible by PP
TRAIN_ITERS=${TRAIN_ITERS:-100000}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-GPT2BPETokenizer}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/gpt-mhc}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-runs/gpt-mhc}

read -r -a data_path <<< "$DATA_PATH"

# Tokenizer files: GPT2BPETokenizer needs VOCAB_FILE + MERGE_FILE, HuggingFaceTokenizer needs
# TOKENIZER_MODEL (a tokenizer.json or its directory), ByteTokenizer needs none.
tokenizer_args=(--tokenizer-type "$TOKENIZER_TYPE")
[[ -n "${VOCAB_FILE:-}" ]] && tokenizer_args+=(--vocab-file "$VOCAB_FILE")
[[ -n "${MERGE_FILE:-}" ]] && tokenizer_args+=(--merge-file "$MERGE_FILE")
[[ -n "${TOKENIZER_MODEL:-}" ]] && tokenizer_args+=(--tokenizer-model "$TOKENIZER_MODEL")

model_args=(
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights
)
parallel_args=(
    --tensor-model-parallel-size "$TP" --sequence-parallel
    --pipeline-model-parallel-size "$PP"
    --num-layers-per-virtual-pipeline-stage "$LAYERS_PER_VIRTUAL_STAGE"
    --use-distributed-optimizer --overlap-grad-reduce  # --overlap-grad-reduce needs DP > 1
    --bf16 --transformer-impl transformer_engine
)
# mHC: n residual streams, H_res projected onto doubly stochastic matrices; the state kept
# for backward once per n layers (3 extra activations per layer instead of 2(n+1)). Add
# --hyper-connections-fused-kernels for the Triton kernels (see README, "Cost").
hc_args=(
    --use-hyper-connections --num-residual-streams "$NUM_RESIDUAL_STREAMS"
    --use-manifold-hyper-connections --recompute-hyper-connections
)
training_args=(
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1
)
output_args=(
    --data-path "${data_path[@]}" "${tokenizer_args[@]}"
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000
    --log-interval 10 --eval-interval 1000 --eval-iters 20 --tensorboard-dir "$TENSORBOARD_DIR"
)

exec torchrun --standalone --nproc-per-node "$GPUS_PER_NODE" \
    -m megatron.hyper_connections.training.pretrain \
    "${model_args[@]}" "${parallel_args[@]}" "${hc_args[@]}" "${training_args[@]}" \
    "${output_args[@]}" "$@"
