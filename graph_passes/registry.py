"""Graph passes and the registry that names them.

``REGISTRY`` maps the name used in recipes and on the command line to the pass class. It is
written out by hand (no import-time registration) so what exists is visible in one place; a
test checks that every recipe's names resolve here.
"""

from __future__ import annotations

from graph_passes.base import GraphPass
from graph_passes.cleanup.collapse_chains import CollapseChains
from graph_passes.cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressions
from graph_passes.cleanup.fold_constants import FoldConstants
from graph_passes.cleanup.fold_shapes import FoldShapes
from graph_passes.cleanup.lift_constants import LiftConstants
from graph_passes.cleanup.merge_duplicate_initializers import MergeDuplicateInitializers
from graph_passes.cleanup.raise_opset import RaiseOpset
from graph_passes.cleanup.remove_dead import RemoveDead
from graph_passes.cleanup.remove_noops import RemoveNoops
from graph_passes.fusions.activation_chains import FuseActivationChains
from graph_passes.fusions.attention import FuseAttention
from graph_passes.fusions.bias_gelu import FuseBiasGelu
from graph_passes.fusions.conv_affine import FuseConvAffine
from graph_passes.fusions.conv_bn import FuseConvBatchNorm
from graph_passes.fusions.decoder_attention import FuseDecoderAttention
from graph_passes.fusions.embed_layer_norm import FuseEmbedLayerNorm
from graph_passes.fusions.gelu import FuseGelu
from graph_passes.fusions.hard_swish import FuseHardSwish
from graph_passes.fusions.layer_norm import FuseLayerNorm
from graph_passes.fusions.pad_conv import FusePadConv
from graph_passes.fusions.rms_norm import FuseRMSNorm
from graph_passes.fusions.skip_layer_norm import FuseSkipLayerNorm
from graph_passes.target.targets import Target

REGISTRY: dict[str, type[GraphPass]] = {
    RaiseOpset.name: RaiseOpset,
    FoldShapes.name: FoldShapes,
    FoldConstants.name: FoldConstants,
    LiftConstants.name: LiftConstants,
    RemoveNoops.name: RemoveNoops,
    CollapseChains.name: CollapseChains,
    FuseConvBatchNorm.name: FuseConvBatchNorm,
    FuseConvAffine.name: FuseConvAffine,
    FusePadConv.name: FusePadConv,
    FuseActivationChains.name: FuseActivationChains,
    FuseHardSwish.name: FuseHardSwish,
    FuseLayerNorm.name: FuseLayerNorm,
    FuseAttention.name: FuseAttention,
    FuseDecoderAttention.name: FuseDecoderAttention,
    FuseEmbedLayerNorm.name: FuseEmbedLayerNorm,
    FuseSkipLayerNorm.name: FuseSkipLayerNorm,
    FuseRMSNorm.name: FuseRMSNorm,
    FuseGelu.name: FuseGelu,
    FuseBiasGelu.name: FuseBiasGelu,
    EliminateCommonSubexpressions.name: EliminateCommonSubexpressions,
    MergeDuplicateInitializers.name: MergeDuplicateInitializers,
    RemoveDead.name: RemoveDead,
}


def create_pass(name: str, target: Target | None = None) -> GraphPass:
    """Instantiate the pass registered under ``name`` for ``target`` (KeyError when unknown)."""
    return REGISTRY[name](target)
