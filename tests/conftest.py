import torch

# 1 thread: tests are small-op bound, and on a shared machine multi-threaded torch can be 3-30x slower
torch.set_num_threads(1)
