# make demo   set up .venv and train the CAPTCHA solver on built-in data (CPU preset, < 15 min)
# make test   set up .venv and run the test suite (CPU only, no network)
# make bench  speed and quality benchmarks (print tables; slow)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 2

.PHONY: demo test bench clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip check
	touch $@

demo: $(BIN)/.installed
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml train_captcha.py \
		--config configs/captcha_quick.yaml --cpu --max_steps 200 --warmup_steps 20 --restart_steps 200 \
		--eval_every_steps 100 --save_every_steps 100 --val_size 100

# Test files are spread over TEST_WORKERS processes (pytest-xdist, one file per worker at a time, so module
# fixtures are built once); each worker and the runs it launches use one thread, so 2 workers fill 2 cores.
TEST_WORKERS ?= 2
test: $(BIN)/.installed
	WANDB_MODE=offline OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

bench: $(BIN)/.installed datasets/pair/meta.json datasets/vqa/meta.json datasets/anomaly/meta.json
	$(BIN)/python benchmarks/captcha_step.py --out bench_out
	$(BIN)/python benchmarks/captcha_data.py --out bench_out
	$(BIN)/python benchmarks/captcha_latency.py --out bench_out
	$(BIN)/python benchmarks/captcha_quality.py --out bench_out   # newest run under runs/captcha
	$(BIN)/python benchmarks/pair_step.py --out bench_out
	$(BIN)/python benchmarks/pair_quality.py --train --out bench_out   # trains 4 variants x 3 seeds (~80 min on 2 cores)
	$(BIN)/python benchmarks/smlm_step.py --out bench_out
	$(BIN)/python benchmarks/smlm_throughput.py --out bench_out
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml train_smlm.py --config configs/smlm_cpu.yaml \
		--cpu --run_name cpu --resume auto --report_to none   # ~70 min on 2 cores; a finished run only re-exports
	$(BIN)/python benchmarks/smlm_quality.py --checkpoint runs/smlm/cpu --out bench_out
	$(BIN)/python benchmarks/vqa_step.py --out bench_out
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml train_vqa.py --config configs/vqa_cpu.yaml \
		--cpu --run_name cpu --resume auto --report_to none   # ~60 min on 2 cores; a finished run only re-exports
	$(BIN)/python benchmarks/vqa_quality.py --checkpoint runs/vqa/cpu --out bench_out
	$(BIN)/python benchmarks/anomaly_aupro.py --out bench_out
	$(BIN)/python benchmarks/anomaly_step.py --out bench_out
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml train_anomaly.py --config configs/anomaly_cpu.yaml \
		--cpu --run_name cpu --resume auto --report_to none   # ~42 min on 2 cores
	$(BIN)/python benchmarks/anomaly_quality.py --checkpoint runs/anomaly/cpu --out bench_out

datasets/pair/meta.json: $(BIN)/.installed
	$(BIN)/python -m data.pair build --out datasets/pair --overwrite

datasets/vqa/meta.json: $(BIN)/.installed
	$(BIN)/python -m data.vqa build --out datasets/vqa --overwrite

datasets/anomaly/meta.json: $(BIN)/.installed
	$(BIN)/python -m data.anomaly build --out datasets/anomaly --overwrite

clean:
	rm -rf $(VENV)
