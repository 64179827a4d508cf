"""Jupyter widgets (ipywidgets 8 + plotly ``FigureWidget``) over the explanation engine.

Imported lazily by ``xaiwidgets`` (``xw.ExplainerWidget`` ...), so the engine never
pulls in ipywidgets or plotly.

* :class:`ExplainerWidget` – one image, one method, every parameter live;
* :class:`FEMStackWidget` – the per-layer FEM maps of MLFEM and their fusion;
* :class:`CompareWidget` – several methods side by side, with metrics against a reference;
* :class:`DatasetExplorer` – a whole dataset's maps and scores, errors first;
* :class:`ConceptExplorer` – the channels of a layer: contributions, conditional maps,
  reference patches, NMF concepts;
* :class:`LookWidget` – the student clicks where they look, then compares with the methods;
* :class:`SanityQuiz` – which of two maps comes from a randomised model?

Every widget writes a standalone HTML handout: ``w.export_html(path)``.
"""

from .compare_widget import CompareWidget
from .concept_explorer import ConceptExplorer
from .dataset_explorer import DatasetExplorer
from .explainer_widget import ExplainerWidget
from .fem_stack_widget import FEMStackWidget
from .look_widget import LookWidget
from .sanity_quiz import SanityQuiz

__all__ = ["CompareWidget", "ConceptExplorer", "DatasetExplorer", "ExplainerWidget",
           "FEMStackWidget", "LookWidget", "SanityQuiz"]
