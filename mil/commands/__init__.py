"""The command layer: commands that read whole-slide images and therefore call :mod:`encoders`.

The core of :mod:`mil` (bags, cohorts, splits, models, tasks, training, metrics, prediction
from bags) never imports ``encoders`` or ``timm``; a test enforces it. What needs slides lives
here and imports ``encoders`` lazily: heatmaps drawn over slides (:mod:`mil.commands.heatmap`),
prediction straight from slides (:mod:`mil.commands.predict`) and the demo
(:mod:`mil.commands.demo`). ``mil extract`` is :func:`encoders.extract.run_extract` itself.
The exit status of commands that go on past failed slides is :mod:`mil.commands.failures`.
"""
