#!/bin/sh
# Render cluster.properties from the environment, format storage once, run the broker.
# KAFKA_NODE_ID (1..n), KAFKA_HOST (this node's name on the network),
# KAFKA_VOTERS ("1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"),
# KAFKA_CLUSTER_ID (22-char base64url, the same on every node).
set -eu
: "${KAFKA_NODE_ID:?}" "${KAFKA_HOST:?}" "${KAFKA_VOTERS:?}" "${KAFKA_CLUSTER_ID:?}"
props=/var/lib/kafka/server.properties
sed -e "s|@NODE_ID@|${KAFKA_NODE_ID}|g" -e "s|@HOST@|${KAFKA_HOST}|g" \
    -e "s|@VOTERS@|${KAFKA_VOTERS}|g" /opt/kafka/cluster.properties > "$props"
cp="/opt/kafka/libs/*"
log4j="-Dlog4j2.configurationFile=/opt/kafka/log4j2.xml"
if [ ! -f /var/lib/kafka/data/meta.properties ]; then
  java $log4j -cp "$cp" kafka.tools.StorageTool format -t "$KAFKA_CLUSTER_ID" -c "$props"
fi
exec java ${KAFKA_HEAP_OPTS:--Xms1g -Xmx1g} -XX:+UseG1GC $log4j -cp "$cp" kafka.Kafka "$props"
