"""Serving a partitioned model: ONNX stages behind gRPC, measured like training.

- ``export``: ``export_pipeline(model, partition, sample_shape, out_dir)`` writes one ONNX file
  per stage (dynamic batch) and checks each against PyTorch with onnxruntime (needs torch).
- ``server``: one stage's gRPC server (onnxruntime, one compute thread, forwards onwards);
  ``launch.launch_stages`` starts one process per stage.
- ``client``: ``PipelineClient.infer(x, M)`` streams M micro-batches through the stages and
  returns the outputs with the request's ``StepReport``; errors name the stage.
- ``reporting``: the StepReport of a request and the run directory (``reports.jsonl``).

Needs the ``serve`` extra (``pip install 'adaptive-pp[serve]'``: onnx, onnxruntime, grpcio).
This package imports nothing heavy itself; import the submodules.
"""
