# make demo     install, write the demo dataset (data/demo) if absent, then embed, fit and submit into outputs/
# make test     install, then the whole test suite, every tier (CI runs this)
# make check    the unit tier only, in seconds (the inner loop)
# make embed fit submit    the three stages on your own data: DATA=... OUT=... (README.md, docs/)
# make docs     regenerate the docs' result tables from benchmarks/results/*.csv
# make bench bench-embed bench-fit bench-writer    speed benchmarks (bench: the three)
# make bench-real bench-cell bench-scale    real tissue, real single cells, the challenge's size (docs/benchmarks.md)
# make install  the virtual environment (.venv) alone
# make clean    remove OUT
# make help     this text (also plain make)
#
# Variables (NAME=value after the target):
#   DATA         a sample zarr or a folder of them (default data/demo)
#   OUT          where the stages write (default outputs)
#   CACHE, MODEL_DIR, SUBMISSION    under OUT by default: features.zarr, model, submission.csv
#   ENCODER, PATCH_SIZES    the features (empty: the default features, slidedata/recipe.py: the recipe measured on real
#                H&E where every sample's pixel size is known, else the handcrafted features at pixel sizes)
#   WEIGHTS      a local copy of the encoder's weights
#   MODELS       the fit's candidates (empty: the default ones)
#   EMBED_ARGS, FIT_ARGS, SUBMIT_ARGS    more options for each stage (.venv/bin/he2expr embed --help, fit, submit)
#   DEMO_DATA, DEMO_NUCLEI, DEMO_PATCH_SIZES    the demo's dataset, its size and its features
#   TEST_WORKERS    pytest-xdist workers (default auto: one per core; 0: one process)
#   HER2ST, XENIUM, BENCH_CELL_ARGS, SCALE, BENCH_SCALE_ARGS    the benchmarks' data and options
#   PYTHON, VENV    the interpreter the environment is made with (python3.11) and its folder (.venv)

PYTHON      ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
DEMO_DATA   ?= data/demo
DATA        ?= $(DEMO_DATA)
OUT         ?= outputs
CACHE       ?= $(OUT)/features.zarr
MODEL_DIR   ?= $(OUT)/model
SUBMISSION  ?= $(OUT)/submission.csv
# empty: the default features (slidedata.recipe.DEFAULT_FEATURES); set either to name the features yourself
ENCODER     ?=
WEIGHTS     ?=
PATCH_SIZES ?=
# The demo names its patch sizes (so its encoder is the handcrafted one): its samples store a pixel size, and the
# default features would add EfficientNet-Lite0 to its minute.
DEMO_PATCH_SIZES ?= 32 64 128 224
# empty: regress.settings.FitSettings' default candidates, the ones measured on the real-tissue benchmarks
MODELS      ?=
DEMO_NUCLEI ?= 3000
EMBED_ARGS  ?=
FIT_ARGS    ?=
SUBMIT_ARGS ?=

.PHONY: help install demo embed fit submit test check docs bench bench-embed bench-fit bench-writer bench-real bench-cell bench-scale clean

help:
	@sed -n '/^$$/q; s/^# \{0,1\}//p' "$(firstword $(MAKEFILE_LIST))"

install: $(STAMP)

# torch first, pinned: on these machines only this pair works beside timm (pip takes both from local disk).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

$(DEMO_DATA)/demo1.zarr: | $(STAMP)
	$(PY) -m synthetic.demo --out "$(DEMO_DATA)" --n-nuclei $(DEMO_NUCLEI)

# Each stage prints its own time; a second run reuses the cache (embed), so it is much faster.
demo: $(STAMP) $(DEMO_DATA)/demo1.zarr
	@$(MAKE) --no-print-directory embed DATA=$(DEMO_DATA) PATCH_SIZES="$(DEMO_PATCH_SIZES)"
	@$(MAKE) --no-print-directory fit DATA=$(DEMO_DATA) PATCH_SIZES="$(DEMO_PATCH_SIZES)"
	@$(MAKE) --no-print-directory submit DATA=$(DEMO_DATA)

embed: $(STAMP)
	$(PY) -m embed --data "$(DATA)" --cache "$(CACHE)" $(if $(ENCODER),--encoder $(ENCODER)) \
	  $(if $(PATCH_SIZES),--patch-sizes $(PATCH_SIZES)) $(if $(WEIGHTS),--weights "$(WEIGHTS)") $(EMBED_ARGS)

fit: $(STAMP)
	$(PY) -m regress --data "$(DATA)" --cache "$(CACHE)" --model-dir "$(MODEL_DIR)" \
	  $(if $(ENCODER),--encoder $(ENCODER)) $(if $(PATCH_SIZES),--patch-sizes $(PATCH_SIZES)) \
	  $(if $(MODELS),--models $(MODELS)) $(FIT_ARGS)

submit: $(STAMP)
	$(PY) -m submission --data "$(DATA)" --cache "$(CACHE)" --model-dir "$(MODEL_DIR)" --out "$(SUBMISSION)" $(SUBMIT_ARGS)

# Both cores (pytest-xdist; TEST_WORKERS=0 runs in one process); tests go to whichever worker is free. Every tier:
# unit, integration and slow (tests/conftest.py), the bench-scale run at a tiny scale included.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# The unit tier (in memory, no file written), in one process: no worker start-up to wait for.
check: $(STAMP)
	$(PY) -m pytest -q -m unit

docs: $(STAMP)
	$(PY) benchmarks/make_docs.py

bench: bench-embed bench-fit bench-writer

bench-embed: $(STAMP) $(if $(filter $(DATA),$(DEMO_DATA)),$(DEMO_DATA)/demo1.zarr)
	$(PY) benchmarks/bench_embed.py --data "$(DATA)"

bench-fit: $(STAMP)
	$(PY) benchmarks/bench_fit.py

bench-writer: $(STAMP)
	$(PY) benchmarks/bench_writer.py

# Real tissue (four her2st sections, leave one section out); says so and exits 0 when the data is absent.
HER2ST      ?= ../shared/data/her2st
bench-real: $(STAMP)
	$(PY) benchmarks/bench_real.py --her2st "$(HER2ST)" --out "$(OUT)"/bench-real

# Real single cells (four 10x Xenium pancreas crops, 377 genes, leave one crop out) between the mean profile and the
# expression-state oracle; says so and exits 0 when the data is absent.
XENIUM      ?= ../shared/data/xenium-pancreas
BENCH_CELL_ARGS ?=
bench-cell: $(STAMP)
	$(PY) benchmarks/bench_cell.py --data "$(XENIUM)" --out "$(OUT)"/bench-cell $(BENCH_CELL_ARGS)

# The challenge's real size: time and peak RSS of every stage on a 20,000 x 22,000 px slide and on a synthetic
# feature cache of all 8 samples (1.67 M nuclei, ~10 GB) under outputs/bench-scale/. SCALE=0.05: a quick run.
SCALE       ?= 1
BENCH_SCALE_ARGS ?=
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py --scale $(SCALE) $(BENCH_SCALE_ARGS)

clean:
	rm -rf "$(OUT)"
