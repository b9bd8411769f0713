# char tiny-shakespeare on a CPU in the wall-clock of nanoGPT's README CPU recipe (block 64, batch 12,
# 4x4x128, 2000 iters, val ~1.886): the same shape and context, 24 x 1000 iterations (the same tokens),
# Muon on the blocks' matrices, rotary positions, QK-norm, ReLU^2, value embeddings, a
# warmup-stable-decay schedule, and bf16 autocast where the CPU has native bf16 (AMX / AVX512-BF16).
# benchmarks/bench_record.py runs it and nanoGPT's own train.py back to back; the table and the
# search that led here are in benchmarks/RESULTS.md ("Issue 15, wave 3").
#   python train.py config/train_shakespeare_char_cpu.py

out_dir = 'out-shakespeare-char'
eval_interval = 1000  # one eval, at the end (nanoGPT's recipe evaluates every 250)
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 24
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
rope = True
qk_norm = True
activation = 'relu2'
value_embed = True

optimizer = 'muon'
muon_lr = 0.02        # block matrices (torch.optim.Muon)
learning_rate = 6e-3  # embeddings/head, gains (AdamW)
beta2 = 0.95        # AdamW; 0.99 was 0.005-0.010 worse in each of 3 seeds (RESULTS.md)
max_iters = 1000
lr_decay_iters = 1000
lr_schedule = 'wsd'
decay_frac = 0.4
warmup_iters = 100
min_lr = 0.0

device = 'cpu'
dtype = 'bfloat16'    # float32 on a CPU without native bf16 (train.py warns there)
compile = False       # inductor compiles for ~16 s here and then steps no faster than eager
