# char tiny-shakespeare on Apple silicon (MPS): nanoGPT's baby GPT scaled down to what an M-series GPU
# trains in a few minutes (4 layers, 4 heads, 256 wide, context 128, batch 32, 2000 iterations), in
# float32 and without torch.compile (neither bf16 autocast nor inductor is dependable on MPS across
# macOS and torch versions). `make demo` picks this file where torch.backends.mps is available
# (glassgpt/hardware.py). Not yet run on a Mac by this project: README "What is tested where".
#   python train.py config/train_shakespeare_char_mps.py

out_dir = 'out-shakespeare-char'
eval_interval = 250
eval_iters = 50
log_interval = 10
always_save_checkpoint = False

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.1

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = 'mps'
dtype = 'float32'
compile = False
