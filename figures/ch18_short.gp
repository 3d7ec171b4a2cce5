# Chapter 18: the book build's own short run: recall accuracy of every mixer (and of MHA without the token
# shift) on the build's MQAR point, one seed, with the values each keeps per layer above its bar. Data: 18_trained_from_scratch/results.csv
# (task,length,x,variant,key,mean,low,high,held,read,...).
load 'style.gp'
data = datadir.'/18_trained_from_scratch/results.csv'
set datafile separator ','
stats data using 2 : 3 nooutput
keys = 'mha gqa mqa window mla dsa linear gdn mha-plain'
names = '"MHA" "GQA" "MQA" "window" "MLA" "DSA" "linear" "GDN" "MHA, no shift"'
at(k) = sum [i = 1 : words(keys)] (word(keys, i) eq k ? i : 0)
set xtics () font ',11'
do for [i = 1 : words(keys)] { set xtics add (word(names, i) i) }
set xrange [0.4 : words(keys) + 0.6]
set yrange [0 : 1.05]
set ylabel 'accuracy on the scored tokens'
set title sprintf('This build: recall of %d pairs at T = %d, one seed', STATS_max_y, STATS_max_x)
chance = 1.0 / 16
set arrow 1 from graph 0, first chance to graph 1, first chance nohead dashtype 3 linecolor rgb '#4d4d4d'
set label 1 'chance' at graph 0.01, first chance + 0.03 font ',10' textcolor rgb '#4d4d4d'
unset key
set boxwidth 0.6
set style fill solid 0.6 noborder
pick(k) = strcol(1) eq 'recall' && at(k) > 0 ? at(k) : NaN
# Above each bar: the values the mixer keeps per layer at this T.
plot data using (pick(strcol(5))) : 6 with boxes linetype 1, \
     data using (pick(strcol(5))) : (column(6) + 0.04) : 9 with labels font ',9' textcolor rgb '#333333'
