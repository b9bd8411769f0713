# char tiny-shakespeare on one CUDA GPU: nanoGPT's baby GPT (6 layers, 6 heads, 384 wide, context 256,
# batch 64, dropout 0.2, 5000 iterations; nanoGPT's README reports val ~1.47 for it) with bf16 autocast,
# torch.compile and flash attention (F.scaled_dot_product_attention picks the flash kernel on CUDA in
# bf16). `make demo` picks this file on a machine with a CUDA GPU (glassgpt/hardware.py). If
# torch.compile fails there (no Triton, e.g. on Windows), training continues uncompiled after one line.
# Not yet run on a GPU by this project: README "What is tested where".
#   python train.py config/train_shakespeare_char_gpu.py

out_dir = 'out-shakespeare-char'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # small dataset: keep the best-val checkpoint only

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = 'cuda'
dtype = 'bfloat16'    # float16 + GradScaler on GPUs without bf16 (pre-Ampere): pass --dtype=float16
compile = True
