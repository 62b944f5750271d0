PY ?= python

.PHONY: test test-gpu bench
# CPU suite (CI). Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
test:
	$(PY) -m pytest -q -m "not gpu"

# On a CUDA machine.
test-gpu:
	$(PY) -m pytest -q -m gpu

bench:
	pbs bench --seq-len 8k,32k,128k
