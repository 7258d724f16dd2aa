"""`tf.train.Example` as protobuf classes, built from its schema at import: no TensorFlow, no tfds.

The schema is TensorFlow's `tensorflow/core/example/{example,feature}.proto` (package `tensorflow`, so the
wire format and full names are identical). tfds vendors the same classes, but importing them runs the
whole `tensorflow_datasets` package init (seconds, in every grain worker); this module costs milliseconds.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _schema() -> descriptor_pb2.FileDescriptorProto:
  f = descriptor_pb2.FileDescriptorProto(name="medcg/tensorflow_example.proto", package="tensorflow",
                                         syntax="proto3")

  def message(name, fields, nested=()):
    m = f.message_type.add(name=name)
    for n in nested:
      m.nested_type.add().CopyFrom(n)
    for i, (fname, ftype, label, type_name, oneof) in enumerate(fields, start=1):
      fd = m.field.add(name=fname, number=i, type=ftype, label=label)
      if type_name:
        fd.type_name = type_name
      if oneof is not None:
        fd.oneof_index = oneof
    return m

  rep, opt = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
  message("BytesList", [("value", _F.TYPE_BYTES, rep, None, None)])
  fl = message("FloatList", [("value", _F.TYPE_FLOAT, rep, None, None)])
  fl.field[0].options.packed = True
  il = message("Int64List", [("value", _F.TYPE_INT64, rep, None, None)])
  il.field[0].options.packed = True
  feature = message("Feature", [("bytes_list", _F.TYPE_MESSAGE, opt, ".tensorflow.BytesList", 0),
                                ("float_list", _F.TYPE_MESSAGE, opt, ".tensorflow.FloatList", 0),
                                ("int64_list", _F.TYPE_MESSAGE, opt, ".tensorflow.Int64List", 0)])
  feature.oneof_decl.add(name="kind")
  entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
  entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=opt)
  entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
  entry.options.map_entry = True
  message("Features", [("feature", _F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry", None)],
          nested=[entry])
  message("Example", [("features", _F.TYPE_MESSAGE, opt, ".tensorflow.Features", None)])
  return f


def _classes():
  pool = descriptor_pool.DescriptorPool()  # private pool: no clash with tfds' or TF's registration
  pool.Add(_schema())
  get = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.{name}"))
  return get("Example"), get("Features"), get("Feature"), get("BytesList"), get("FloatList"), get("Int64List")


Example, Features, Feature, BytesList, FloatList, Int64List = _classes()


def canonical(raw: bytes) -> bytes:
  """A serialized `tf.train.Example` re-serialized with its feature map in key order (byte-stable).

  Protobuf writes map entries in hash-table order, which varies between processes; `deterministic=True`
  sorts them by key, so equal examples give equal bytes (and shards equal sha256).
  """
  example = Example()
  example.ParseFromString(raw)
  return example.SerializeToString(deterministic=True)
