# Finetune OpenAI's GPT-2 (124M) on tiny Shakespeare in GPT-2 BPE:
#   python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py
# gpt2 fits a common GPU (weights, AdamW state and batch-4 activations: an estimated ~5 GB in bf16;
# not measured here, no GPU was lent). nanoGPT's original choice was gpt2-xl (1.5B), which runs out
# of memory on 24 GB cards: --init_from=gpt2-xl still works where it fits.
#
# The learning rate, warmup, dropout and batch come from a sweep at small scale (a 4-layer BPE model
# pretrained on English, finetuned onto Shakespeare, scored on the mean of Shakespeare val and
# English val, i.e. learning the new text without forgetting the old): python -m benchmarks.bench_finetune,
# table in docs/training.md ("Finetuning a run or GPT-2").
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2'

# only save checkpoints if the validation loss improves: the sweep found the new text's val loss still
# falling at the longest run tried while the old text's rose, so the best-val checkpoint is the early stop
always_save_checkpoint = False

# the number of examples per iter, nanoGPT's: 4 batch_size * 8 grad_accum * 1024 tokens = 32,768 tokens/iter;
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters. Twice the batch at half the steps tied in the sweep.
batch_size = 4
gradient_accumulation_steps = 8
max_iters = 20

# 0.3x the pretraining peak (GPT-2 small's 6e-4): in the sweep 0.1x learnt the new text too slowly and
# 1x forgot the most; constant after a short warmup (5% of the run, a tie with none in the sweep)
learning_rate = 1.8e-4
decay_lr = True
warmup_iters = 1
lr_decay_iters = 20
min_lr = 1.8e-4  # = learning_rate: no decay after the warmup
dropout = 0.0    # 0.1 was worse on both texts in the sweep
