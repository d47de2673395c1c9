.PHONY: demo test setup down

demo:  ## set up, run synth/reference on the embedded world through Prefect, query it
	scripts/demo.sh

test:  ## set up and run the whole test suite
	scripts/test.sh

setup:
	scripts/setup.sh

down:  ## stop the local Prefect server and the serve process
	.venv/bin/flywheel down
